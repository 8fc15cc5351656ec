"""The causal LM as a transformers model: `SparseSSMHFForCausalLM` (`PreTrainedModel` +
`GenerationMixin`) wraps — shares, never copies — a `sparse_ssm.model.SparseSSMForCausalLM`
(`.model`), so `save_pretrained` / `from_pretrained`, `generate`, pipelines and
lm-evaluation-harness run our own modules, prefill and recurrent step.

`generate` carries a `SparseSSMHFCache`: the per-layer recurrent states (`LayerState`) and the
number of tokens they have absorbed.  The prompt is prefilled once; every further token is one
`model.step` (no recomputation of the prefix, constant cost per token).  A left-padded batch
(attention_mask with zeros) is prefilled row by row on its real tokens only, since a recurrent
state would not ignore padding: each row gets exactly the state of its unpadded prompt.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..generate.cache import batch_size, repeat_rows, select_rows, stack_rows
from ..model import LayerState, SparseSSMForCausalLM
from ..model.memory import MemoryNeed
from .config import SparseSSMHFConfig
from .remote import AUTO_MAP, write_remote_code

# the name of the cache in transformers' outputs and forward arguments (`cache` since 5.2x)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SparseSSMHFCache(Cache):
    """The recurrent state of a batch for transformers' `generate`: `states` (one `LayerState`
    per layer, conv (b, E, K-1), ssm (b, H, N, P); None before the first forward) and
    `seen_tokens`, the tokens each row has absorbed (padding not counted per row)."""

    is_compileable = False

    def __init__(self, states: list[LayerState] | None = None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.states, self.seen_tokens = states, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        # False: transformers then slices the prompt it is given to the tokens the state has not seen
        return [False]

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.states is None else batch_size(self.states)

    def reset(self):
        self.states, self.seen_tokens = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.states is not None:
            self.states = select_rows(self.states, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.states is not None:
            self.states = repeat_rows(self.states, repeats)

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("a recurrent state cannot forget tokens; generate again from the prompt")


class SparseSSMHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SparseSSMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SparseSSMBlock"]
    _is_stateful = True                      # transformers: no assisted decoding (a state cannot be rolled back)
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: SparseSSMHFConfig, model: SparseSSMForCausalLM | None = None):
        super().__init__(config)
        if model is None:
            model_config = config.to_sparse_ssm()
            MemoryNeed.inference(model_config).check("the sparse-ssm model of this Hugging Face config", "cpu",
                                                     "its config.json describes a model too large for this machine: "
                                                     "load it where more memory is free")
            model = SparseSSMForCausalLM(model_config)
        self.model = model
        self.post_init()

    @classmethod
    def from_model(cls, model: SparseSSMForCausalLM, **config_kwargs) -> "SparseSSMHFForCausalLM":
        """Wrap an existing model (its modules are shared); config_kwargs: eos_token_id, ...."""
        return cls(SparseSSMHFConfig.from_sparse_ssm(model.config, **config_kwargs), model)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with our auto_map files (not a copy of our source, which a model
        loaded with trust_remote_code would otherwise get)."""
        self._auto_class = self.config._auto_class = None
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = [type(self).__name__]
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    def _init_weights(self, module):
        """Nothing: our modules initialise themselves (HiPPO A, dt bias, scaled residuals) when built."""

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, **kwargs):
        """input_ids (b, L) -> logits (b, L, vocab) (the last `logits_to_keep` positions if > 0),
        loss (mean next-token cross-entropy; labels = input_ids, -100 ignored) and the cache after
        the last token (`cache` / `past_key_values`: a SparseSSMHFCache, updated in place)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not isinstance(cache, SparseSSMHFCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"{type(cache).__name__} holds attention keys/values; sparse-ssm needs a SparseSSMHFCache")
            cache = None                                        # an empty default cache of transformers
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        past = cache.states if cache is not None else None
        padded = attention_mask is not None and past is None and bool((attention_mask == 0).any())
        if padded:
            logits, states = self._forward_unpadded(input_ids, attention_mask)
        elif past is not None and input_ids.shape[1] == 1 and labels is None:
            logits, states = self.model.step(input_ids[:, 0], past)            # one recurrent step
            logits = logits[:, None]
        else:
            out = self.model(input_ids, cache=past, last_logits_only=logits_to_keep == 1 and labels is None)
            logits, states = out.logits, out.cache
        loss = None
        if labels is not None:
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten()
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-100)
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if use_cache:
            cache = cache if cache is not None else SparseSSMHFCache()
            cache.states = states
            cache.seen_tokens += input_ids.shape[1] if not padded else int(attention_mask.sum(1).max())
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return output if return_dict is not False else output.to_tuple()

    def _forward_unpadded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Each row on its real tokens (mask 1; left or right padding): logits (b, L, vocab) with
        zeros at padded positions, and the states after each row's last real token."""
        logits, caches = None, []
        for row in range(input_ids.shape[0]):
            keep = attention_mask[row].bool()
            out = self.model(input_ids[row, keep][None])
            if logits is None:
                logits = out.logits.new_zeros(*input_ids.shape, out.logits.shape[-1])
            logits[row, keep] = out.logits[0]
            caches.append(out.cache)
        return logits, stack_rows(caches)
