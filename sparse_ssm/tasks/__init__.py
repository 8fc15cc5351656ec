"""The tasks floor: synthetic tasks that train small models to evaluate a layer (the Mamba paper's
selective copying and induction heads, group word problems, and the Chomsky-hierarchy tasks of
Deletang et al. 2023 with their length-generalisation protocol).  They are not part of training:
nothing in `train` imports this floor; `cli` (`evaluate --task`) and `bench/` do."""
