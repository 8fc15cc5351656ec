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
- STEM.teacher.safetensors (with --distillation): per record the teacher's token ids of `text`
  and, for each generated token, the teacher's top-k ids and log-probabilities (temperature 1)::

      token_ids (T,) int32, record_offsets (R+1,) int64    record r: token_ids[o[r]:o[r+1]]
      teacher_start (R,) int64                              first generated position in record r
      top_ids (G, k) int32, top_logprobs (G, k) float32     -1 / -inf where a slot is empty
      target_offsets (R+1,) int64                           rows of record r: top_*[g[r]:g[r+1]];
                                                            row j is the distribution of token
                                                            teacher_start[r] + j of the record
- STEM.tokenizer.json: the teacher's tokenizer (from its GGUF file).
- .STEM.partial.jsonl while running: every finished request as one line (accepted or rejected),
  so an interrupted run loses nothing and `--resume` continues after the last line.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .config import SyntheticConfig
from .teachers import Completion, Request, Teacher
from .training import atomic_write_text

FORMAT_VERSION = 1


class SyntheticError(RuntimeError):
    """The synthetic-data run cannot start or go on; the message says how to fix it."""


# --- prompts ---------------------------------------------------------------------------------
def _prompts_from_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise SyntheticError(f"prompts file {file} does not exist (--prompts / synthetic.prompts_file)")
    prompts = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
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


# --- quality -----------------------------------------------------------------------------------
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def quality_problem(text: str, min_words: int) -> str | None:
    """Why a sample is unusable ("empty", "too_short", "repetitive"), or None."""
    w = words(text)
    if not w:
        return "empty"
    if len(w) < min_words:
        return "too_short"
    trigrams = list(zip(w, w[1:], w[2:]))
    if len(trigrams) >= 12 and len(set(trigrams)) < 0.5 * len(trigrams):
        return "repetitive"        # a loop: most word trigrams occur more than once
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 4 and Counter(lines).most_common(1)[0][1] > len(lines) / 2:
        return "repetitive"
    return None


class NearDuplicates:
    """Exact and near-duplicate detection: MinHash signatures of word 5-gram shingles with
    locality-sensitive banding to find candidates, then the exact Jaccard similarity of the
    shingle sets against `threshold`."""

    def __init__(self, threshold: float, num_hashes: int = 64, bands: int = 16):
        self.threshold, self.bands, self.rows = threshold, bands, num_hashes // bands
        rng = np.random.default_rng(12345)
        self.prime = (1 << 61) - 1
        self.a = rng.integers(1, self.prime, num_hashes, dtype=np.uint64).astype(object)
        self.b = rng.integers(0, self.prime, num_hashes, dtype=np.uint64).astype(object)
        self.exact: set[str] = set()
        self.buckets: dict[tuple, list[int]] = {}
        self.shingles: list[frozenset] = []

    @staticmethod
    def _shingles(text: str) -> frozenset:
        w = words(text)
        n = 5 if len(w) >= 5 else max(1, len(w))
        return frozenset(hashlib.blake2b(" ".join(w[i:i + n]).encode(), digest_size=8).digest()
                         for i in range(max(1, len(w) - n + 1)))

    def _signature(self, shingles: frozenset) -> list[int]:
        values = [int.from_bytes(s, "little") for s in shingles]
        return [min((a * v + b) % self.prime for v in values) for a, b in zip(self.a, self.b)]

    def check_and_add(self, text: str) -> str | None:
        """"duplicate" / "near_duplicate" when an earlier sample matches, else remember it, None."""
        key = hashlib.sha256(" ".join(words(text)).encode()).hexdigest()
        if key in self.exact:
            return "duplicate"
        shingles = self._shingles(text)
        signature = self._signature(shingles)
        bands = [(b, tuple(signature[b * self.rows:(b + 1) * self.rows])) for b in range(self.bands)]
        candidates = {i for band in bands for i in self.buckets.get(band, [])}
        for i in candidates:
            other = self.shingles[i]
            if len(shingles & other) / len(shingles | other) >= self.threshold:
                return "near_duplicate"
        self.exact.add(key)
        index = len(self.shingles)
        self.shingles.append(shingles)
        for band in bands:
            self.buckets.setdefault(band, []).append(index)
        return None


def text_statistics(texts: list[str]) -> dict:
    """Words and distinct-n (distinct n-grams / all n-grams, n = 1, 2, 3) over all samples."""
    all_words = [words(t) for t in texts]
    stats = {"words": sum(len(w) for w in all_words)}
    for n in (1, 2, 3):
        grams = [tuple(w[i:i + n]) for w in all_words for i in range(len(w) - n + 1)]
        stats[f"distinct_{n}"] = round(len(set(grams)) / max(1, len(grams)), 4)
    return stats


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
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
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


def create_synthetic(cfg: SyntheticConfig, teacher: Teacher, resume: bool = False, overwrite: bool = False,
                     log=print, progress: bool = True) -> dict:
    """Ask `teacher` for samples until `cfg.num_samples` pass the filters (or the attempts run out),
    then write the dataset files; returns the statistics."""
    from tqdm.auto import tqdm

    paths = output_paths(cfg)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, teacher)
    if paths["partial"].exists() and not resume:
        raise SyntheticError(f"an interrupted run left {paths['partial']}: continue it with --resume, or delete it "
                             f"to start again")
    if paths["json"].exists() and not (resume and paths["partial"].exists()) and not overwrite:
        raise SyntheticError(f"{paths['json']} already exists: pass --overwrite to replace it, or choose another "
                             f"--output-file")
    if cfg.distillation:
        teacher.tokenizer_json()          # fail before any request when the teacher's tokenizer is out of reach
    file_prompts = _prompts_from_file(cfg.prompts_file) if cfg.prompts_file else None
    lines = _read_partial(paths["partial"], settings) if resume and paths["partial"].exists() else []
    if resume and lines:
        log(f"resuming: {len(lines)} requests already done ({sum(1 for r in lines if r['rejected'] is None)} kept)")
    elif not lines:
        paths["partial"].write_text(json.dumps({"settings": settings}) + "\n")
    dedup = NearDuplicates(cfg.near_duplicate_threshold)
    for line in lines:
        if line["rejected"] is None:
            dedup.check_and_add(line["text"])
    kept = sum(1 for line in lines if line["rejected"] is None)
    rejected = len(lines) - kept
    max_attempts = cfg.num_samples * cfg.max_attempts_factor
    k = cfg.top_logprobs if cfg.distillation else 0
    # a wave of requests: concurrent ones to a server, or one batch decoded together in this process
    workers = cfg.workers if teacher.concurrent else getattr(teacher, "max_batch", 1)
    opening = settings["prompt_style"] == "opening"

    def request(index: int):
        prompt = make_prompt(cfg, index, file_prompts, settings["prompt_style"])
        return prompt, Request(prompt=prompt["prompt"], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed * 7919 + index, top_logprobs=k)

    def ask(index: int):
        prompt, req = request(index)
        return prompt, teacher.complete(req)

    def ask_wave(wave: range):
        if teacher.concurrent and workers > 1:
            return list(pool.map(ask, wave))
        if workers > 1:                                   # a batching local teacher
            prompts, requests = zip(*map(request, wave))
            return list(zip(prompts, teacher.complete_batch(list(requests))))
        return [ask(i) for i in wave]

    bar = tqdm(total=cfg.num_samples, initial=kept, desc="synthetic", unit="sample", disable=not progress,
               dynamic_ncols=True)
    start, new_tokens, index, kept_at_start = time.perf_counter(), 0, len(lines), kept
    interrupted = False
    try:
        with open(paths["partial"], "a") as sidecar, ThreadPoolExecutor(max_workers=workers) as pool:
            while kept < cfg.num_samples and index < max_attempts:
                wave = range(index, min(max_attempts, index + min(workers, cfg.num_samples - kept)))
                results = ask_wave(wave)
                for i, (prompt, completion) in zip(wave, results):
                    text = (prompt["prompt"] + completion.text) if opening and not file_prompts else completion.text
                    problem = quality_problem(completion.text, cfg.min_words)
                    if problem is None and k and (completion.token_ids is None or min(completion.token_ids, default=0) < 0):
                        problem = "unmappable_tokens"       # a token string with no id in the teacher's vocabulary
                    if problem is None and kept >= cfg.num_samples:
                        problem = "surplus"
                    if problem is None:
                        problem = dedup.check_and_add(completion.text)
                    line = _record_line(i, prompt, completion, text, problem, bool(k))
                    sidecar.write(json.dumps(line, ensure_ascii=False) + "\n")
                    sidecar.flush()
                    lines.append(line)
                    new_tokens += completion.num_tokens
                    if problem is None:
                        kept += 1
                        bar.update(1)
                    else:
                        rejected += 1
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{new_tokens / max(elapsed, 1e-9):.1f}", rejected=rejected)
                index = wave.stop
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        if not lines:                     # nothing done yet: leave nothing behind
            paths["partial"].unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if interrupted:
        raise KeyboardInterrupt(f"interrupted after {kept} samples: they are kept in {paths['partial']}; "
                                f"continue with --resume")
    elapsed = time.perf_counter() - start
    records = [r for r in lines if r["rejected"] is None]
    if not records:
        raise SyntheticError(f"none of {len(lines)} samples passed the filters ({dict(Counter(r['rejected'] for r in lines))}); "
                             f"check the teacher's output, raise max_new_tokens or lower min_words")
    if kept < cfg.num_samples:
        log(f"warning: only {kept} of {cfg.num_samples} samples passed the filters in {len(lines)} requests "
            f"(synthetic.max_attempts_factor = {cfg.max_attempts_factor})")
    stats = {"samples": len(records), "requests": len(lines),
             "rejected": dict(Counter(r["rejected"] for r in lines if r["rejected"])),
             "teacher_tokens": sum(r["num_tokens"] for r in records), **text_statistics([r["text"] for r in records]),
             "seconds_this_run": round(elapsed, 1),
             "samples_per_s": round((kept - kept_at_start) / max(elapsed, 1e-9), 3),
             "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1)}
    payload = {"version": FORMAT_VERSION, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **settings, "stats": stats,
               "records": [{"id": n, "prompt": r["prompt"], "topic": r["topic"], "style": r["style"], "text": r["text"],
                            "num_tokens": r["num_tokens"], "finish_reason": r["finish_reason"]}
                           for n, r in enumerate(records)]}
    if k:
        _write_teacher_file(paths["teacher"], records, k, opening and not file_prompts)
        shutil.copyfile(teacher.tokenizer_json(), paths["tokenizer"])
        payload["distillation"] = {"file": paths["teacher"].name, "tokenizer": paths["tokenizer"].name, "top_k": k}
    atomic_write_text(paths["json"], json.dumps(payload, ensure_ascii=False, indent=1))
    paths["partial"].unlink()
    return {**stats, "path": str(paths["json"])}


def _write_teacher_file(path: Path, records: list[dict], k: int, with_prompt: bool):
    from safetensors.numpy import save_file

    ids, starts, record_offsets, target_offsets, tops, logps = [], [], [0], [0], [], []
    for r in records:
        prompt_ids = r["prompt_ids"] if with_prompt else []
        ids.extend(prompt_ids + r["token_ids"])
        starts.append(len(prompt_ids))
        record_offsets.append(len(ids))
        tops.extend(r["top_ids"])
        logps.extend(r["top_logprobs"])
        target_offsets.append(len(tops))
    tensors = {"token_ids": np.array(ids, dtype=np.int32), "record_offsets": np.array(record_offsets, dtype=np.int64),
               "teacher_start": np.array(starts, dtype=np.int64),
               "target_offsets": np.array(target_offsets, dtype=np.int64),
               "top_ids": np.array(tops, dtype=np.int32).reshape(-1, k),
               "top_logprobs": np.array(logps, dtype=np.float32).reshape(-1, k)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"version": str(FORMAT_VERSION), "top_k": str(k)})
    os.replace(tmp, path)
