"""Evaluate a reward model on preference pairs (``rewardkit eval``).

Reported per data file:

* ``accuracy`` (share of pairs with r_chosen > r_rejected; a tie counts half), overall, per task family (the row's
  ``task.family``, or ``task`` when it is a string), and per artifact condition: for each artifact in the row's
  ``artifacts`` (the testbed's bookkeeping), ``<name>:agrees`` / ``<name>:disagrees`` (present, and the artifact sits
  on the chosen / the rejected response) and ``<name>:absent``;
* ``mean_margin``: mean of r_c - r_r in served (normalised) units, and ``mean_margin_raw`` in raw head units;
* ``ece``: expected calibration error of p = sigmoid(raw r_c - raw r_r), the probability the Bradley-Terry model
  assigns to the label. Confidence is max(p, 1 - p), correct means p > 0.5; 10 equal-width bins over [0.5, 1];
  ECE = sum_b (n_b / N) |accuracy_b - confidence_b|. Raw units because that is the scale the BT loss trained;
* ``masking_probe`` (the Id-RM paper's probe): accuracy when the first 0%, 20%, ..., 80% of each text's *content*
  tokens are hidden: the tokens of the prompt's message contents and of the response, in reading order. The chat
  template (role markers, the default system message it inserts, ``<|im_end|>``) is never hidden: hiding the first
  k% of the formatted text hid only the system prompt at 20-40% (as a run of eos tokens), which measured nothing.
  ``probe_scope="formatted"`` keeps that old behaviour for comparison; ``probe_scope="answer"`` hides the given
  fraction of the answer span's tokens only (testbed rows carry ``answer_span``), the sanity case: with the answer
  fully hidden, chosen and rejected differ in nothing the model can see, and accuracy is chance. ``replace`` mode
  (default) swaps the hidden token ids for the tokenizer's pad id, keeping positions and length; ``drop`` mode removes
  them from the input, which is the same as attention-masking them with positions recounted. The reward token itself
  is never hidden. A model that reads the evidence loses accuracy as the mask grows; one that keeps it ignores it.

Example::

    report = evaluate(load_reward_model("runs/bt"), pairs)
    report.summary()["accuracy"]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rewardkit.core.formatting import EncodedItem, Formatter
from rewardkit.core.forward import raw_reward
from rewardkit.core.loading import RewardModel
from rewardkit.core.scoring import Scorer
from rewardkit.training.data import PreferencePair, load_preferences
from rewardkit.training.features import EncodedPair, encode_pairs, extract_features, pair_batches

__all__ = ["EvalReport", "content_spans", "evaluate", "evaluate_path", "expected_calibration_error", "format_table",
           "mask_item", "probe_tokens"]

PROBE_FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8)
PROBE_MODES = ("replace", "drop")
PROBE_SCOPES = ("content", "formatted", "answer")
# Test splits of a testbed directory, in the order reports list them.
TESTBED_SPLITS = ("test", "test_clean", "test_flip_length", "test_flip_boilerplate", "test_flip_format",
                  "test_late_evidence", "validation")


def expected_calibration_error(p_label: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of pairwise probabilities ``p_label`` = P(chosen preferred) under the model, (N,) -> float."""
    conf = torch.maximum(p_label, 1 - p_label)  # (N,)
    correct = (p_label > 0.5).float()  # (N,)
    edges = torch.linspace(0.5, 1.0, n_bins + 1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        sel = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if sel.any():
            ece += float(sel.float().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def mask_item(item: EncodedItem, fraction: float, pad_token_id: int, mode: str = "replace",
              tokens: Sequence[int] | None = None) -> EncodedItem:
    """Hide the first ``fraction`` of ``tokens`` (token indices in reading order; default: every token of the
    formatted text), never the last token (the reward token). See the module docstring for the modes."""
    n = item.num_tokens
    eligible = [i for i in (range(n) if tokens is None else tokens) if 0 <= i < n - 1]
    k = min(int(math.floor(fraction * (n if tokens is None else len(eligible)))), len(eligible))
    if mode not in PROBE_MODES:
        raise ValueError(f"probe mode must be one of {PROBE_MODES}, got {mode!r}")
    if k <= 0:
        return item
    hide = set(eligible[:k])
    if mode == "replace":
        ids = tuple(pad_token_id if i in hide else t for i, t in enumerate(item.input_ids))
        return dataclasses.replace(item, input_ids=ids)
    keep = [i for i in range(n) if i not in hide]
    return dataclasses.replace(item, input_ids=tuple(item.input_ids[i] for i in keep),
                               offsets=tuple(item.offsets[i] for i in keep))


def _overlapping(item: EncodedItem, spans: Sequence[tuple[int, int]]) -> list[int]:
    return [i for i, (s, e) in enumerate(item.offsets) if e > s and any(s < b and e > a for a, b in spans)]


def content_spans(item: EncodedItem, prompt: Any) -> list[tuple[int, int]]:
    """Character spans of the prompt's message contents (found in order in the text before the response) and of the
    response: what a masking probe may hide. Template text between them is left out."""
    if isinstance(prompt, str):
        contents = [prompt]
    elif isinstance(prompt, list):
        contents = [str(m.get("content", "")) for m in prompt if isinstance(m, dict)]
    else:
        contents = []
    spans, pos = [], 0
    head = item.text[:item.response_start]
    for c in contents:
        j = head.find(c, pos) if c else -1
        if j >= 0:
            spans.append((j, j + len(c)))
            pos = j + len(c)
    spans.append((item.response_start, item.response_end))
    return spans


def probe_tokens(item: EncodedItem, pair: PreferencePair, side: str, scope: str) -> list[int] | None:
    """The token indices a probe of ``scope`` hides from (None: every token, the ``formatted`` scope)."""
    if scope == "formatted":
        return None
    if scope == "content":
        return _overlapping(item, content_spans(item, pair.prompt))
    if scope == "answer":
        span = (pair.meta.get("answer_span") or {}).get(side)
        if not span:
            raise ValueError("probe_scope='answer' needs rows with answer_span (the testbed's); this row has none")
        a, b = item.response_start + int(span[0]), item.response_start + int(span[1])
        while a > item.response_start and item.text[a - 1].isspace():  # BPE puts the leading space in the word
            a -= 1
        return _overlapping(item, [(a, b)])
    raise ValueError(f"probe_scope must be one of {PROBE_SCOPES}, got {scope!r}")


def _accuracy(diff: torch.Tensor) -> float:
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()) if len(diff) else float("nan")


@dataclasses.dataclass
class EvalReport:
    """Per-pair rewards (normalised and raw) and the metrics computed from them."""

    name: str
    pairs: list[EncodedPair]
    r_chosen: torch.Tensor  # (N,) served units
    r_rejected: torch.Tensor
    raw_chosen: torch.Tensor  # (N,) raw head units
    raw_rejected: torch.Tensor
    dropped: dict[str, Any]
    probe: dict[str, float] = dataclasses.field(default_factory=dict)
    probe_mode: str = "replace"
    probe_scope: str = "content"
    probe_pairs: int = 0
    relevance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, list[int]]]:
        """Pair indices per task family and per artifact condition."""
        fam: dict[str, list[int]] = defaultdict(list)
        art: dict[str, list[int]] = defaultdict(list)
        for i, ep in enumerate(self.pairs):
            task = ep.pair.meta.get("task")
            family = task.get("family") if isinstance(task, dict) else task
            if family is not None:
                fam[str(family)].append(i)
            artifacts = ep.pair.meta.get("artifacts")
            if isinstance(artifacts, dict):
                for name, a in artifacts.items():
                    if not isinstance(a, dict):
                        continue
                    cond = "absent" if not a.get("present") else "agrees" if a.get("agrees") else "disagrees"
                    art[f"{name}:{cond}"].append(i)
        return {"family": dict(sorted(fam.items())), "artifact": dict(sorted(art.items()))}

    def summary(self) -> dict[str, Any]:
        diff = self.r_chosen - self.r_rejected
        raw_diff = self.raw_chosen - self.raw_rejected
        g = self.groups()
        out: dict[str, Any] = {
            "name": self.name, "pairs": len(self.pairs), "accuracy": _accuracy(diff),
            "mean_margin": float(diff.mean()) if len(diff) else float("nan"),
            "mean_margin_raw": float(raw_diff.mean()) if len(diff) else float("nan"),
            "ece": expected_calibration_error(torch.sigmoid(raw_diff)) if len(diff) else float("nan"),
            "per_family": {k: {"pairs": len(v), "accuracy": _accuracy(diff[v])} for k, v in g["family"].items()},
            "per_artifact": {k: {"pairs": len(v), "accuracy": _accuracy(diff[v])} for k, v in g["artifact"].items()},
            "dropped": self.dropped,
        }
        if self.relevance:
            out["relevance"] = self.relevance
        if self.probe:
            out["masking_probe"] = {"mode": self.probe_mode, "scope": self.probe_scope, "pairs": self.probe_pairs,
                                    "accuracy": self.probe}
        return out


def _score_pairs(scorer: Scorer, pairs: Sequence[EncodedPair], max_tokens: int, progress: bool, desc: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    n = len(pairs)
    rc, rr, qc, qr = (torch.zeros(n) for _ in range(4))
    with tqdm(total=sum(p.num_tokens for p in pairs), unit="tok", desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in pair_batches(pairs, max_tokens):
            s = scorer.score_batch([pairs[i].chosen for i in batch] + [pairs[i].rejected for i in batch])
            for j, i in enumerate(batch):
                c, r = s[j], s[len(batch) + j]
                rc[i], rr[i], qc[i], qr[i] = c.reward, r.reward, c.raw_reward, r.raw_reward
            bar.update(sum(pairs[i].num_tokens for i in batch))
    return rc, rr, qc, qr


def _score_from_features(rm: RewardModel, pairs: Sequence[EncodedPair], max_tokens: int, progress: bool,
                         cache_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same rewards from cached reward-token hidden states: ``head(h)``, normalised as the scorer does."""
    with_ll = bool(rm.meta.ll_weight)  # the read-out's LL term is the features' last column then
    h_c, h_r = extract_features(rm, pairs, max_tokens=max_tokens, cache_dir=cache_dir, progress=progress,
                                with_ll=with_ll)
    hid = rm.hidden_size
    with torch.no_grad():
        qc = raw_reward(rm, h_c[:, :hid], h_c[:, hid] if with_ll else None).cpu()  # (N,)
        qr = raw_reward(rm, h_r[:, :hid], h_r[:, hid] if with_ll else None).cpu()
    mean, std = rm.meta.norm_mean, rm.meta.norm_std
    return (qc - mean) / std, (qr - mean) / std, qc, qr


def evaluate(rm: RewardModel, pairs: Sequence[PreferencePair], *, name: str = "data", max_length: int = 2048,
             max_tokens: int = 4096, probe_fractions: Sequence[float] = PROBE_FRACTIONS, probe_mode: str = "replace",
             probe_max_pairs: int = 0, progress: bool = True, feature_cache_dir: str | Path | None = None,
             probe_scope: str = "content", relevance: bool = False) -> EvalReport:
    """Score every pair (dropping over-long ones, counted) and run the masking probe on the first
    ``probe_max_pairs`` pairs (0 = all).

    ``feature_cache_dir``: compute (or reuse) the reward-token hidden states there and apply the head to them. The
    backbone forward does not depend on the head, so every head trained on a frozen backbone is evaluated from one
    pass; the numbers equal the plain scorer's to fp32 rounding (tested).
    """
    if probe_mode not in PROBE_MODES:
        raise ValueError(f"probe_mode must be one of {PROBE_MODES}, got {probe_mode!r}")
    if probe_scope not in PROBE_SCOPES:
        raise ValueError(f"probe_scope must be one of {PROBE_SCOPES}, got {probe_scope!r}")
    for f in probe_fractions:
        if not 0.0 <= f <= (1.0 if probe_scope == "answer" else 0.999999):
            raise ValueError(f"probe fractions must be within [0, 1) ([0, 1] for the answer scope), got {f}")
    enc, report = encode_pairs(pairs, Formatter(rm.tokenizer, max_length=max_length))
    scorer = Scorer(rm, prefix_sharing=False)

    def score(ps: Sequence[EncodedPair], desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if feature_cache_dir is not None:
            return _score_from_features(rm, ps, max_tokens, progress, feature_cache_dir)
        return _score_pairs(scorer, ps, max_tokens, progress, desc)

    rc, rr, qc, qr = score(enc, f"eval {name}")
    out = EvalReport(name=name, pairs=enc, r_chosen=rc, r_rejected=rr, raw_chosen=qc, raw_rejected=qr,
                     dropped=report.to_dict()["dropped"], probe_mode=probe_mode, probe_scope=probe_scope)
    if relevance and len(enc) >= 2:
        out.relevance = _relevance(rm, enc, score, max_length)
    sub = enc[:probe_max_pairs] if probe_max_pairs else enc
    out.probe_pairs = len(sub)
    for f in probe_fractions:
        if f == 0.0:
            out.probe[f"{f:.1f}"] = _accuracy(rc[:len(sub)] - rr[:len(sub)])
            continue
        masked = [dataclasses.replace(
            ep, chosen=mask_item(ep.chosen, f, rm.pad_token_id, probe_mode,
                                 probe_tokens(ep.chosen, ep.pair, "chosen", probe_scope)),
            rejected=mask_item(ep.rejected, f, rm.pad_token_id, probe_mode,
                               probe_tokens(ep.rejected, ep.pair, "rejected", probe_scope))) for ep in sub]
        mc, mr, _, _ = score(masked, f"probe {f:.0%}")
        out.probe[f"{f:.1f}"] = _accuracy(mc - mr)
    return out


def _relevance(rm: RewardModel, enc: Sequence[EncodedPair], score: Any, max_length: int) -> dict[str, Any]:
    """Own chosen response vs a borrowed one on the same prompt (see :func:`evaluate`)."""
    from rewardkit.training.features import to_score_item
    from rewardkit.training.partners import draw_partners

    partner, _ = draw_partners(len(enc), seed=0)
    fmt = Formatter(rm.tokenizer, max_length=max_length)
    borrowed = [dataclasses.replace(ep, rejected=fmt.encode(
        to_score_item(ep.pair.prompt, enc[partner[i]].pair.chosen), index=i, truncate=True))
        for i, ep in enumerate(enc)]
    own, other, _, _ = score(borrowed, "relevance")
    d = own - other
    return {"pairs": len(borrowed), "accuracy": _accuracy(d), "mean_margin": float(d.mean()),
            "max_abs_margin": float(d.abs().max())}


def data_files(path: str | Path) -> list[tuple[str, Path]]:
    """A file -> [(stem, file)]; a testbed directory -> its test splits (and validation) that exist."""
    p = Path(path)
    if p.is_dir():
        files = [(s, p / f"{s}.jsonl") for s in TESTBED_SPLITS if (p / f"{s}.jsonl").is_file()]
        if not files:
            raise ValueError(f"{p} holds none of {TESTBED_SPLITS} as .jsonl; pass a file or a testbed directory")
        return files
    if not p.is_file():
        raise ValueError(f"--data {p} does not exist")
    return [(p.stem, p)]


def evaluate_path(rm: RewardModel, path: str | Path, *, splits: Sequence[str] | None = None, max_pairs: int = 0,
                  **kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate every file of ``path`` (see :func:`data_files`); returns one summary per file."""
    import random

    results = []
    for name, file in data_files(path):
        if splits and name not in splits:
            continue
        pairs, _ = load_preferences(file)
        if max_pairs and max_pairs < len(pairs):
            pairs = random.Random(f"rewardkit-eval:{name}").sample(pairs, max_pairs)
        results.append(evaluate(rm, pairs, name=name, **kwargs).summary())
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Human-readable tables: one line per file, then per-family, per-artifact and probe breakdowns."""
    lines = [f"{'data':<24} {'pairs':>5} {'acc':>6} {'margin':>7} {'ece':>6}  masking probe (acc at 0/20/40/60/80%)"]
    for r in results:
        probe = r.get("masking_probe", {}).get("accuracy", {})
        probe_s = " ".join(f"{v:.3f}" for v in probe.values()) if probe else "-"
        lines.append(f"{r['name']:<24} {r['pairs']:>5} {r['accuracy']:>6.3f} {r['mean_margin']:>7.3f} "
                     f"{r['ece']:>6.3f}  {probe_s}")
    for key, title in (("per_family", "family"), ("per_artifact", "artifact condition")):
        rows = [(r["name"], k, v) for r in results for k, v in r[key].items()]
        if rows:
            lines += ["", f"{'data':<24} {title:<28} {'pairs':>5} {'acc':>6}"]
            lines += [f"{n:<24} {k:<28} {v['pairs']:>5} {v['accuracy']:>6.3f}" for n, k, v in rows]
    rel = [(r["name"], r["relevance"]) for r in results if "relevance" in r]
    if rel:
        lines += ["", f"{'data':<24} {'relevance (own vs borrowed response)':<36} {'pairs':>5} {'acc':>6}"]
        lines += [f"{n:<24} {'':<36} {v['pairs']:>5} {v['accuracy']:>6.3f}" for n, v in rel]
    return "\n".join(lines)


def write_json(results: Sequence[dict[str, Any]], path: str | Path, extra: dict[str, Any] | None = None) -> None:
    from rewardkit.core.checkpoint import atomic_write_bytes

    payload = {**(extra or {}), "results": list(results)}
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))
