"""Synthetic training text from a teacher LM (`main.py create-synthetic`), optionally with the
teacher's top-k next-token distributions for distillation.

    summary = create_synthetic(config.synthetic, teacher)      # writes the files below

Files, in `output_dir` (FILE = output_file, STEM its name without .json):
- FILE: one JSON object (written atomically when the run ends)::

      {"version": 1, "created": ISO time, "teacher": {"backend", "model", ...},
       "sampling": {"temperature", "top_p", "top_k", "max_new_tokens", "seed"},
       "prompt_style": "instruction" | "opening", "stats": {...},
       "distillation": null | {"file": "STEM.teacher.safetensors", "tokenizer": "STEM.tokenizer.json", "top_k": k},
       "records": [{"id", "prompt", "topic", "style", "text", "num_tokens", "finish_reason"}, ...]}

  `text` is what a student trains on: the teacher's continuation, preceded by the prompt for
  "opening" prompts (the start of a text a base model continues).
- STEM.teacher.safetensors and STEM.tokenizer.json (with --distillation): per record the
  teacher's token ids of `text` and, for each generated token, the teacher's top-k ids and
  log-probabilities (temperature 1); the layout is in `sparse_ssm.data.teacher_targets`.
- .STEM.partial.jsonl while running: every finished request as one line (accepted or rejected),
  so an interrupted run loses nothing and `--resume` continues after the last line.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..data.teacher_targets import write_teacher_targets
from ..util.errors import SyntheticError
from ..util.files import atomic_write_text, overlaps
from .backends import Completion, Request, Teacher
from .config import SyntheticConfig
from .quality import NearDuplicates, quality_problem, text_statistics

FORMAT_VERSION = 1


# --- prompts ---------------------------------------------------------------------------------
def _prompts_from_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise SyntheticError(f"prompts file {file} does not exist (--prompts / synthetic.prompts_file)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SyntheticError(f"prompts file {file} is unreadable ({e}); give a UTF-8 text file with one prompt per "
                             f"line (or JSONL with \"prompt\")") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SyntheticError(f"{file}:{number}: expected a JSON object with a \"prompt\" field") from None
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise SyntheticError(f"prompts file {file} holds no prompts")
    return prompts


def make_prompt(cfg: SyntheticConfig, index: int, file_prompts: list[str] | None = None,
                prompt_style: str = "opening") -> dict:
    """The prompt of request `index` in `prompt_style` ("instruction" | "opening"); deterministic in
    synthetic.seed and index, so a resumed run asks what the uninterrupted one would have."""
    if file_prompts:
        return {"prompt": file_prompts[index % len(file_prompts)], "topic": None, "style": None}
    rng = random.Random(cfg.seed * 1_000_003 + index)
    topic, style = rng.choice(cfg.topics), rng.choice(cfg.styles)
    fields = {"topic": topic, "style": style, "Topic": topic[:1].upper() + topic[1:]}
    template = cfg.instruction if prompt_style == "instruction" else rng.choice(cfg.openings)
    try:
        prompt = template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise SyntheticError(f"prompt template {template!r}: only {{topic}}, {{Topic}} and {{style}} may be used ({e})") from None
    return {"prompt": prompt, "topic": topic, "style": style}


# --- the run -----------------------------------------------------------------------------------
def output_paths(cfg: SyntheticConfig) -> dict[str, Path]:
    folder = Path(cfg.output_dir)
    stem = Path(cfg.output_file).stem
    return {"json": folder / cfg.output_file, "partial": folder / f".{stem}.partial.jsonl",
            "teacher": folder / f"{stem}.teacher.safetensors", "tokenizer": folder / f"{stem}.tokenizer.json"}


def _settings(cfg: SyntheticConfig, teacher: Teacher) -> dict:
    return {"teacher": teacher.describe(),
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                         "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
            "prompt_style": cfg.resolved_prompt_style(teacher.backend),
            "distillation": {"top_k": cfg.top_logprobs} if cfg.distillation else None}


def _record_line(index: int, prompt: dict, completion: Completion, text: str, problem: str | None,
                 distill: bool) -> dict:
    line = {"index": index, **prompt, "text": text, "num_tokens": completion.num_tokens,
            "finish_reason": completion.finish_reason, "rejected": problem}
    if distill and problem is None:
        line["prompt_ids"] = completion.prompt_ids or []
        line["token_ids"] = completion.token_ids
        line["top_ids"] = completion.top_ids.tolist()
        line["top_logprobs"] = np.round(completion.top_logprobs.astype(np.float64), 5).tolist()
    return line


def _read_partial(path: Path, settings: dict) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError, UnicodeDecodeError):
        raise SyntheticError(f"{path} is not a partial synthetic run; delete it to start again") from None
    if header.get("settings") != json.loads(json.dumps(settings)):
        raise SyntheticError(f"{path} was started with other settings ({json.dumps(header.get('settings'))[:300]}); "
                             f"resume with the same teacher, sampling and --distillation, or delete it to start again")
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break                         # the line being written when the run stopped
    return records


def check_inputs(cfg: SyntheticConfig, resume: bool = False, overwrite: bool = False) -> list[str] | None:
    """Check what a run needs besides its teacher (call it before loading one): the output folder
    (created) is writable, no interrupted run or existing dataset is in the way, the prompts file
    is readable; returns the prompts of the file (None without one)."""
    paths = output_paths(cfg)
    folder = paths["json"].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SyntheticError(f"output directory {folder}: cannot create it ({e.strerror}); choose another "
                             f"--output-dir") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SyntheticError(f"output directory {folder} is not writable; choose another --output-dir")
    if paths["partial"].exists() and not resume:
        raise SyntheticError(f"an interrupted run left {paths['partial']}: continue it with --resume, or delete it "
                             f"to start again")
    written = [paths[k] for k in (("json", "teacher", "tokenizer") if cfg.distillation else ("json",))]
    for path in written:
        if cfg.prompts_file and overlaps(path, cfg.prompts_file):
            raise SyntheticError(f"{path} is the prompts file this run reads (--prompts); choose another "
                                 f"--output-file")
        if path.exists() and not (resume and paths["partial"].exists()) and not overwrite:
            raise SyntheticError(f"{path} already exists: pass --overwrite to replace it, or choose another "
                                 f"--output-file")
    return _prompts_from_file(cfg.prompts_file) if cfg.prompts_file else None


class _Run:
    """One create-synthetic run: the sidecar of finished requests, the filters, the waves of requests."""

    def __init__(self, cfg: SyntheticConfig, teacher: Teacher, resume: bool, overwrite: bool, log):
        self.cfg, self.teacher, self.log = cfg, teacher, log
        self.paths = paths = output_paths(cfg)
        self.file_prompts = check_inputs(cfg, resume, overwrite)
        self.settings = _settings(cfg, teacher)
        if cfg.distillation:
            teacher.tokenizer_json()          # fail before any request when the teacher's tokenizer is out of reach
        self.lines = _read_partial(paths["partial"], self.settings) if resume and paths["partial"].exists() else []
        if resume and self.lines:
            log(f"resuming: {len(self.lines)} requests already done "
                f"({sum(1 for r in self.lines if r['rejected'] is None)} kept)")
        elif not self.lines:
            paths["partial"].write_text(json.dumps({"settings": self.settings}) + "\n")
        self.dedup = NearDuplicates(cfg.near_duplicate_threshold)
        for line in self.lines:
            if line["rejected"] is None:
                self.dedup.check_and_add(line["text"])
        self.kept = self.kept_at_start = sum(1 for line in self.lines if line["rejected"] is None)
        self.k = cfg.top_logprobs if cfg.distillation else 0
        # a wave of requests: concurrent ones to a server, or one batch decoded together in this process
        self.workers = cfg.workers if teacher.concurrent else getattr(teacher, "max_batch", 1)
        self.opening = self.settings["prompt_style"] == "opening"
        self.new_tokens = 0

    def _request(self, index: int):
        cfg = self.cfg
        prompt = make_prompt(cfg, index, self.file_prompts, self.settings["prompt_style"])
        return prompt, Request(prompt=prompt["prompt"], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed * 7919 + index, top_logprobs=self.k)

    def _ask(self, index: int):
        prompt, request = self._request(index)
        return prompt, self.teacher.complete(request)

    def _ask_wave(self, wave: range, pool) -> list:
        if self.teacher.concurrent and self.workers > 1:
            return list(pool.map(self._ask, wave))
        if self.workers > 1:                                   # a batching local teacher
            prompts, requests = zip(*map(self._request, wave))
            return list(zip(prompts, self.teacher.complete_batch(list(requests))))
        return [self._ask(i) for i in wave]

    def _judge(self, index: int, prompt: dict, completion: Completion) -> dict:
        """The sidecar line of a finished request: kept, or the reason it was rejected."""
        text = (prompt["prompt"] + completion.text) if self.opening and not self.file_prompts else completion.text
        problem = quality_problem(completion.text, self.cfg.min_words)
        if problem is None and self.k and (completion.token_ids is None or min(completion.token_ids, default=0) < 0):
            problem = "unmappable_tokens"       # a token string with no id in the teacher's vocabulary
        if problem is None and self.kept >= self.cfg.num_samples:
            problem = "surplus"
        if problem is None:
            problem = self.dedup.check_and_add(completion.text)
        return _record_line(index, prompt, completion, text, problem, bool(self.k))

    def collect(self, progress: bool):
        """Ask until num_samples are kept or the attempts run out; every line goes to the sidecar at once."""
        from tqdm.auto import tqdm

        cfg, max_attempts = self.cfg, self.cfg.num_samples * self.cfg.max_attempts_factor
        rejected, index, start = len(self.lines) - self.kept, len(self.lines), time.perf_counter()
        bar = tqdm(total=cfg.num_samples, initial=self.kept, desc="synthetic", unit="sample", disable=not progress,
                   dynamic_ncols=True)
        try:
            with open(self.paths["partial"], "a") as sidecar, ThreadPoolExecutor(max_workers=self.workers) as pool:
                while self.kept < cfg.num_samples and index < max_attempts:
                    wave = range(index, min(max_attempts, index + min(self.workers, cfg.num_samples - self.kept)))
                    for i, (prompt, completion) in zip(wave, self._ask_wave(wave, pool)):
                        line = self._judge(i, prompt, completion)
                        sidecar.write(json.dumps(line, ensure_ascii=False) + "\n")
                        sidecar.flush()
                        self.lines.append(line)
                        self.new_tokens += completion.num_tokens
                        if line["rejected"] is None:
                            self.kept += 1
                            bar.update(1)
                        else:
                            rejected += 1
                        bar.set_postfix(tok_s=f"{self.new_tokens / max(time.perf_counter() - start, 1e-9):.1f}",
                                        rejected=rejected)
                    index = wave.stop
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted after {self.kept} samples: they are kept in {self.paths['partial']}; "
                                    f"continue with --resume") from None
        except Exception:
            if not self.lines:                     # nothing done yet: leave nothing behind
                self.paths["partial"].unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        self.seconds = time.perf_counter() - start

    def write(self) -> dict:
        """The dataset files from the kept records; the statistics."""
        cfg, lines, paths = self.cfg, self.lines, self.paths
        records = [r for r in lines if r["rejected"] is None]
        if not records:
            raise SyntheticError(f"none of {len(lines)} samples passed the filters "
                                 f"({dict(Counter(r['rejected'] for r in lines))}); check the teacher's output, raise "
                                 f"max_new_tokens or lower min_words")
        if self.kept < cfg.num_samples:
            self.log(f"warning: only {self.kept} of {cfg.num_samples} samples passed the filters in {len(lines)} "
                     f"requests (synthetic.max_attempts_factor = {cfg.max_attempts_factor})")
        elapsed = max(self.seconds, 1e-9)
        stats = {"samples": len(records), "requests": len(lines),
                 "rejected": dict(Counter(r["rejected"] for r in lines if r["rejected"])),
                 "teacher_tokens": sum(r["num_tokens"] for r in records), **text_statistics([r["text"] for r in records]),
                 "seconds_this_run": round(self.seconds, 1),
                 "samples_per_s": round((self.kept - self.kept_at_start) / elapsed, 3),
                 "tokens_per_s": round(self.new_tokens / elapsed, 1)}
        payload = {"version": FORMAT_VERSION,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   **self.settings, "stats": stats,
                   "records": [{"id": n, "prompt": r["prompt"], "topic": r["topic"], "style": r["style"],
                                "text": r["text"], "num_tokens": r["num_tokens"], "finish_reason": r["finish_reason"]}
                               for n, r in enumerate(records)]}
        if self.k:
            write_teacher_targets(paths["teacher"], records, self.k, self.opening and not self.file_prompts)
            shutil.copyfile(self.teacher.tokenizer_json(), paths["tokenizer"])
            payload["distillation"] = {"file": paths["teacher"].name, "tokenizer": paths["tokenizer"].name,
                                       "top_k": self.k}
        atomic_write_text(paths["json"], json.dumps(payload, ensure_ascii=False, indent=1))
        paths["partial"].unlink()
        return {**stats, "path": str(paths["json"])}


def create_synthetic(cfg: SyntheticConfig, teacher: Teacher, resume: bool = False, overwrite: bool = False,
                     log=print, progress: bool = True) -> dict:
    """Ask `teacher` for samples until `cfg.num_samples` pass the filters (or the attempts run out),
    then write the dataset files; returns the statistics."""
    run = _Run(cfg, teacher, resume, overwrite, log)
    run.collect(progress)
    return run.write()
