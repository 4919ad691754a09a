"""Query cost of InstructEd: time instructed queries against the unedited model (issue #15 item 3).

:func:`measure_query_cost` edits the embedded model (or a tiny test model) with ``apply_instructed_to_model``
and times, input by input, the unedited forward and the instructed forward of ``prompt + ' ' + target_new``
back to back (wall clock and process CPU time), gold and retrieval, with the query-cost options of the
``question_rows`` / ``question_only`` variants (``sim_overlap``, the bfloat16 sentence encoder), the onnx encoder
runtime where asked (``backends``) and a diagnostic row
whose ``sim`` is computed before the timer (the instructed forward's own cost); once per variant the fused attention
kernel's logits beside the eager path's (:func:`fused_against_eager`). Beside it: the sentence encoder's own share of
a forward (:func:`_encoder_share`) and how far the bfloat16 encoder (or the onnx runtime) moves ``sim``
(:func:`sim_deviation`).
:func:`query_cost_lines` renders that part of the report from the saved JSON. The ablation script
(``benchmarks/instructed_ablations.py``) calls both; every ratio carries a 95% bootstrap interval over the
inputs (paired: an input's two forwards are resampled together).
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.results_io import mean_with_ci, ratio_interval

LOG = logging.getLogger("instructed_latency")
#: #15 item 3: the query cost target (edited / unedited forward).
QUERY_TARGET = 1.1
#: Re-weighting modes with cached instruction keys/values (``question_only`` is not in the paper).
CACHED_MODES = ("question_rows", "question_only")


def _forward_ms(model, tok, text: str) -> tuple[float, float]:
    """``(wall ms, process CPU ms)`` of one forward of ``text`` (CPU time of every thread of the process)."""
    enc = tok([text], return_tensors="pt")
    c0, t0 = time.process_time(), time.perf_counter()
    model(**enc)
    return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000


def _latency_settings(variant: Any, backends: tuple[str, ...] = ("torch",)) -> list[tuple[str, dict, bool]]:
    """``(source, hparams overrides, sim before timer)`` of each query-cost row of ``variant``; every backend of
    ``backends`` after ``torch`` (``onnx``: the same float32 encoder in ONNX Runtime) adds gold and retrieval rows."""
    editing = dict(variant.editing)
    other = [] if editing.get("encoder_dtype", "float32") != "float32" else [b for b in backends if b != "torch"]
    if variant.reweight_mode not in CACHED_MODES:
        settings = [("gold", dict(editing), False), ("retrieval", dict(editing), False), ("gold", dict(editing), True)]
        if not editing and variant.reweight_mode == "paper":
            settings += [(s, {"embedding_cache": 0}, False) for s in ("gold", "retrieval")]
        return settings + [(s, dict(editing, encoder_backend=b), False) for b in other for s in ("gold", "retrieval")]
    warm = dict(editing, warm_instruction_cache=True)  # instruction keys/values computed at edit time
    settings = [("gold", warm, False), ("retrieval", warm, False), ("gold", warm, True)]
    # #15 item 3's query-cost options: sim beside the forward (gold: the question's encoding; retrieval reuses the
    # search's), the bfloat16 sentence encoder, and both
    settings.append(("gold", dict(warm, sim_overlap=True), False))
    if editing.get("encoder_dtype", "float32") == "float32":
        half = dict(warm, encoder_dtype="bfloat16")
        settings += [("gold", half, False), ("retrieval", half, False), ("gold", dict(half, sim_overlap=True), False)]
    return settings + [(s, dict(warm, encoder_backend=b), False) for b in other for s in ("gold", "retrieval")]


def measure_query_cost(targets: list[tuple[str, Any, Path]], model, tok, requests: list[dict],
                       hparams_for: Callable[..., Any], resamples: int, backends: tuple[str, ...] = ("torch",)) -> dict:
    """Query / unedited ratios (gold and retrieval) of each ``(name, variant, archive)`` of ``targets``, plus
    ``paper`` without the instruction-embedding cache and, for ``question_rows`` / ``question_only`` variants, the
    query-cost options;
    each input's edited and unedited forwards are timed back to back (wall clock and process CPU time).
    ``hparams_for(archive, **fields)`` builds the variant's ``InstructEdHyperParams``; ``resamples``: bootstrap
    resamples of every interval; ``backends``: the sentence-encoder runtimes timed (``onnx`` adds rows)."""
    import torch

    from instructedit_plugin.instructed.instructed_main import apply_instructed_to_model, editing_state, reset_memory

    texts = [f"{r['prompt']} {r['target_new']}" for r in requests]
    rows = []
    encoder_share: dict = {}
    fused_checks: dict = {}
    load_before = _load_average()
    for name, variant, archive in targets:
        for source, extra, sim_outside in _latency_settings(variant, backends):
            hp = hparams_for(archive, reweight_mode=variant.reweight_mode, instruction_source=source, **extra)
            reset_memory(model)
            edit_ms = []
            for r in requests:  # one edit at a time: the edit cost (memory + warm caches)
                t0 = time.perf_counter()
                apply_instructed_to_model(model, tok, [dict(r)], hp, keep_original_weight=False)
                edit_ms.append((time.perf_counter() - t0) * 1000)
                reset_memory(model)
            batch = [dict(r) for r in requests] if source == "retrieval" else [dict(requests[0])]
            qm, _ = apply_instructed_to_model(model, tok, batch, hp, keep_original_weight=False)
            hits = None
            if source == "gold" and not extra.get("sim_overlap") and name not in fused_checks:
                fused_checks[name] = fused_against_eager(qm, tok, texts)
            if source == "retrieval":
                state = editing_state(model)
                hits = sum(state.memory.select(r["prompt"], gate=qm.provider.gate, top_k=qm.provider.top_k) is not None
                           for r in requests)
            base, edited, base_cpu, edited_cpu = [], [], [], []
            with torch.no_grad():
                sims = [_sim_of(qm, tok, text) for text in texts] if sim_outside else None
                if sims is not None:  # the precomputed sim gives the forward's own logits, bit for bit
                    want = qm(**tok([texts[0]], return_tensors="pt")).logits
                    qm.__dict__["similarities"] = lambda *a, **k: sims[0]
                    if not torch.equal(qm(**tok([texts[0]], return_tensors="pt")).logits, want):
                        raise RuntimeError("a precomputed sim changed the instructed logits; the diagnostic row "
                                           "would not time the same forward")
                if hp.sim_overlap:  # the overlapped forward gives the sequential one's logits, bit for bit
                    qm.sim_overlap = False
                    want = qm(**tok([texts[0]], return_tensors="pt")).logits
                    qm.sim_overlap = True
                    if not torch.equal(qm(**tok([texts[0]], return_tensors="pt")).logits, want):
                        raise RuntimeError("sim_overlap changed the instructed logits")
                for text in texts[:2]:  # warm-up
                    model(**tok([text], return_tensors="pt"))
                    qm(**tok([text], return_tensors="pt"))
                for i, text in enumerate(texts):
                    if sims is not None:  # an instance attribute shadows the method for this input's forward
                        qm.__dict__["similarities"] = lambda *a, _sim=sims[i], **k: _sim
                    wall, cpu = _forward_ms(model, tok, text)
                    base.append(wall)
                    base_cpu.append(cpu)
                    wall, cpu = _forward_ms(qm, tok, text)
                    edited.append(wall)
                    edited_cpu.append(cpu)
                qm.__dict__.pop("similarities", None)
            dtype, backend = hp.encoder_dtype, hp.encoder_backend
            share_key = dtype if backend == "torch" else backend  # onnx runs float32 only
            if share_key not in encoder_share:  # once per encoder: what encoding one question costs beside a forward
                encoder_share[share_key] = _encoder_share(model, tok, editing_state(model).encoder, requests, texts,
                                                          resamples)
            reset_memory(model)
            cache = qm.embedding_cache
            rows.append({"variant": name, "source": source, "reweight_mode": variant.reweight_mode,
                         "embedding_cache": extra.get("embedding_cache", 4096),
                         "warm_instruction_cache": bool(extra.get("warm_instruction_cache")),
                         "sim_outside_timer": sim_outside, "sim_overlap": bool(hp.sim_overlap), "encoder_dtype": dtype,
                         "encoder_backend": backend,
                         "attention": "fused" if qm.fused_attention else "eager",
                         "query_ratio": ratio_interval(base, edited, resamples),
                         "cpu_ratio": ratio_interval(base_cpu, edited_cpu, resamples),
                         "base_ms": round(statistics.median(base), 2), "query_ms": round(statistics.median(edited), 2),
                         "base_cpu_ms": round(statistics.median(base_cpu), 2),
                         "query_cpu_ms": round(statistics.median(edited_cpu), 2),
                         "edit_ms": round(statistics.median(edit_ms), 2), "retrieval_hits": hits,
                         "embedding_cache_hits": None if cache is None else cache.hits})
            LOG.info("query cost %s", rows[-1])
    out = {"inputs": len(texts), "rows": rows, "encoder": encoder_share.get("float32"),
           "load_average": [load_before, _load_average()]}
    for key in ("bfloat16", "onnx"):
        if key in encoder_share:
            out[f"encoder_{key}"] = encoder_share[key]
    if fused_checks:
        out["fused_check"] = fused_checks
    return out


def _logit_agreement(run, texts: list[str], tok) -> dict:
    """Largest absolute logit difference between ``run(enc, False)`` and ``run(enc, True)`` over ``texts``, and at
    how many input positions their top-1 tokens agree."""
    import torch

    diff, agree, positions = 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            enc = tok([text], return_tensors="pt")
            first, second = run(enc, False).float(), run(enc, True).float()
            diff = max(diff, float((second - first).abs().max()))
            agree += int((second.argmax(-1) == first.argmax(-1)).sum())
            positions += int(enc["input_ids"].numel())
    return {"max_abs_logit_diff": round(diff, 4), "top1_agree": agree, "positions": positions}


def fused_against_eager(qm, tok, texts: list[str]) -> dict:
    """The fused kernel's logits beside the eager path's on the timed inputs (the same edited model, gold): the
    largest absolute difference and how many input positions keep their top-1 token; beside it, for scale, the
    same comparison of the unedited model's own ``eager`` and ``sdpa`` attention (both stock transformers)."""
    def instructed(enc, fused):
        qm.fused_attention = fused
        return qm(**enc).logits

    model = qm.model
    before = model.config._attn_implementation

    def stock(enc, sdpa):
        model.set_attn_implementation("sdpa" if sdpa else "eager")
        try:
            return model(**enc).logits
        finally:
            model.set_attn_implementation(before)

    out = {"inputs": len(texts), **_logit_agreement(instructed, texts, tok)}
    qm.fused_attention = True
    out["stock_eager_vs_sdpa"] = _logit_agreement(stock, texts, tok)
    LOG.info("fused kernel against eager: %s", out)
    return out


def _load_average() -> float | None:
    """The machine's 1-minute load average (``None`` where the OS has none): the report says how busy it was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def sim_deviation(requests: list[dict], resamples: int, dtype: str = "bfloat16", backend: str = "torch") -> dict:
    """How far the ``dtype`` / ``backend`` sentence encoder moves ``sim`` from the paper's (float32, torch):
    ``|cos - cos32|`` over every (question, instruction) pair of ``requests`` (prompt, rephrase, portability and
    locality questions against the request's instruction; each text encoded alone, as the embedding cache does):
    max, and mean with its interval (``digits`` enough for the onnx runtime's float-rounding differences)."""
    from instructedit_plugin.instructed.lm import load_encoder
    from instructedit_plugin.instructed.templates import instruction_of, request_prompts

    full, other = load_encoder("default"), load_encoder("default", dtype=dtype, backend=backend)
    pairs = [(q, instruction_of(r)) for r in requests for q in request_prompts(r, include_locality=True)]
    texts = sorted({t for pair in pairs for t in pair})
    vec32 = {t: full.encode([t])[0] for t in texts}
    vec = {t: other.encode([t])[0] for t in texts}
    delta = [abs(float(vec[q] @ vec[i]) - float(vec32[q] @ vec32[i])) for q, i in pairs]
    digits = 5 if backend == "torch" else 9
    out = {"dtype": dtype, "pairs": len(pairs), "max": round(max(delta), digits),
           "mean": mean_with_ci(delta, resamples, digits=digits)}
    if backend != "torch":
        out["backend"] = backend
    LOG.info("sim deviation of the %s %s encoder: %s", dtype, backend, out)
    return out


def _sim_of(qm, tok, text: str):
    """``sim`` of ``text``'s instructed input, as the wrapper computes it in a forward."""
    enc = tok([text], return_tensors="pt")
    selection = qm.select(qm._rows(enc["input_ids"], enc["attention_mask"]))[0]
    return qm.similarities([selection.question], [selection.instruction], [selection.subject], [selection.encoded])


def _encoder_share(model, tok, encoder, requests: list[dict], texts: list[str], resamples: int) -> dict:
    """The sentence encoder's own cost: ``encoder.encode([prompt])`` (what ``sim`` needs per query: the question
    alone) timed back to back with the unedited forward of the same input, same threads; ratio with interval."""
    import torch

    base, encode = [], []
    with torch.no_grad():
        for r, text in zip(requests[:2], texts[:2]):  # warm-up
            encoder.encode([r["prompt"]])
            model(**tok([text], return_tensors="pt"))
        for r, text in zip(requests, texts):
            base.append(_forward_ms(model, tok, text)[0])
            t0 = time.perf_counter()
            encoder.encode([r["prompt"]])
            encode.append((time.perf_counter() - t0) * 1000)
    out = {"encode_ms": round(statistics.median(encode), 2), "base_ms": round(statistics.median(base), 2),
           "ratio": ratio_interval(base, encode, resamples)}
    LOG.info("question encoding alone: %s", out)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _ratio(q) -> str:
    return "–" if q is None else f"{q[0]:.2f} [{q[1]:.2f}, {q[2]:.2f}]"


def _share_line(share: dict, what: str) -> str:
    e = share["ratio"]
    return (f"{what}: median {share['encode_ms']:.1f} ms beside the unedited forward's {share['base_ms']:.1f} ms, "
            f"**{e[0]:.3f}x [{e[1]:.3f}, {e[2]:.3f}]** of it, timed back to back on the same inputs and threads")


def query_cost_lines(out: dict) -> list[str]:
    """The report's query-cost section and its targets (every run's rows, numbered as ``--merge`` added them)."""
    args, lat = out["args"], out["latency"]
    lines = ["", "## Query cost", "",
             f"Median forward of `prompt + ' ' + target_new` over {lat['inputs']} inputs (the first {args['latency_n']} "
             "records of each file), edited model / unedited model, each input's two forwards timed back to back; "
             "interval: bootstrap over the inputs. Gold: one edit's instruction in front of every input; retrieval: "
             "the memory holds the edits of all timed inputs. Edit: median time of one `apply_instructed_to_model` "
             "call (memory insert, and in `question_rows` with `warm_instruction_cache` the instruction's keys/values). "
             "Rows with *sim* 'before timer' are a diagnostic: each input's `sim` is computed before its timer starts, "
             "so they show the instructed forward's own cost without the sentence encoder. *sim* 'overlapped' "
             "(`sim_overlap`): the question's encoding runs in a worker thread while the forward runs up to its first "
             "attention, which waits for it -- outputs bit-identical (checked in the run), but it uses a second core: "
             "its wall-clock ratio is what a query waits, its **CPU-time ratio** (process CPU time of every thread, "
             "`time.process_time`) what it costs. Encoder `bfloat16` (`encoder_dtype`) is an option, not the "
             "paper's encoder (its deviation in *sim* is below the table). Run: 1 = the run described above, higher: "
             "runs merged in (`--merge`, listed at the end); CPU-time ratios were not recorded in run 1.", "",
             "| run | variant | source | re-weighting | attention | embedding cache | instruction K/V at edit | sim | "
             "encoder | unedited ms | edited ms | query / unedited (wall) | query / unedited (CPU time) | edit ms | "
             "retrieval hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in lat["rows"]:
        sim = "before timer" if r.get("sim_outside_timer") else "overlapped" if r.get("sim_overlap") else "timed"
        lines.append(f"| {r.get('run', 1)} | {r['variant']} | {r['source']} | {r['reweight_mode']} | "
                     f"{r.get('attention', 'eager')} | {'on' if r['embedding_cache'] else 'off'} | {'yes' if r['warm_instruction_cache'] else 'no'} | "
                     f"{sim} | {_encoder_label(r)} | {r['base_ms']:.1f} | {r['query_ms']:.1f} | "
                     f"{_ratio(r['query_ratio'])} | {_ratio(r.get('cpu_ratio'))} | {r['edit_ms']:.1f} | "
                     f"{'–' if r['retrieval_hits'] is None else r['retrieval_hits']} |")
    runs = {"1": lat, **(lat.get("runs") or {})}
    lines.append("")
    for run, info in runs.items():
        said = []
        if info.get("encoder"):
            said.append(_share_line(info["encoder"], "question encoding alone (`encoder.encode([prompt])`, which every "
                                    "re-weighting mode needs for `sim`; in retrieval the memory search's encoding is "
                                    "reused, so one per query)"))
        if info.get("encoder_bfloat16"):
            said.append(_share_line(info["encoder_bfloat16"], "the same with the bfloat16 encoder"))
        if info.get("encoder_onnx"):
            said.append(_share_line(info["encoder_onnx"], "the same with the float32 encoder run by ONNX Runtime "
                                    "(`encoder_backend: onnx`)"))
        for dev in (info.get("sim_deviation"), info.get("sim_deviation_onnx")):
            if dev:
                m, what = dev["mean"], (f"the {dev['dtype']} encoder" if "backend" not in dev else
                                        f"the {dev['dtype']} encoder run by {dev['backend']}")
                said.append(f"{what} moves *sim* by at most {dev['max']:.2g} (mean {m[0]:.2g} "
                            f"[{m[1]:.2g}, {m[2]:.2g}]) from the float32 torch encoder's over the {dev['pairs']} "
                            "question / instruction pairs of the evaluated records")
        load = info.get("load_average")
        if load:
            said.append(f"machine load average (1 min) {load[0]} before and {load[1]} after the query-cost "
                        "measurement (2 cores, shared with other jobs)")
        for variant, check in (info.get("fused_check") or {}).items():
            stock = check.get("stock_eager_vs_sdpa")
            said.append(f"`{variant}` with the fused attention kernel beside the eager one on the {check['inputs']} "
                        f"timed inputs (gold): logits differ by at most {check['max_abs_logit_diff']:g}, the top-1 token "
                        f"agrees at {check['top1_agree']} of {check['positions']} positions"
                        + ("" if not stock else f" (for scale, the unedited model's own eager and sdpa attention: "
                           f"{stock['max_abs_logit_diff']:g}, {stock['top1_agree']} of {stock['positions']})"))
        if said:
            lines.append(f"* Run {run}: " + "; ".join(said) + ".")
    lines += ["", "## Targets", "", f"Query cost <= {QUERY_TARGET:g} x the unedited model, in `question_rows` (and "
              "`question_only`, not in the paper) with the embedding cache (the sim-before-timer diagnostic rows "
              "excluded). Wall clock is what the target measures; the CPU-time column says whether it was met by using "
              "a second core.", "",
              "| run | target | setting | met (wall clock) | wall clock | CPU time |", "|---|---|---|---|---|---|"]
    for r in lat["rows"]:
        if r["reweight_mode"] in CACHED_MODES and r["embedding_cache"] and not r.get("sim_outside_timer"):
            q = r["query_ratio"]
            setting = ", ".join(x for x in ("question_only (option, not in the paper)"
                                            if r["reweight_mode"] == "question_only" else "",
                                            "sim overlapped" if r.get("sim_overlap") else "",
                                            f"{r.get('encoder_dtype')} encoder (option)"
                                            if r.get("encoder_dtype", "float32") != "float32" else "",
                                            "the paper's encoder run by onnx (same function)"
                                            if r.get("encoder_backend", "torch") == "onnx" else "") if x) or "as the paper"
            lines.append(f"| {r.get('run', 1)} | {r['variant']} {r['source']}: query <= {QUERY_TARGET:g} x unedited | "
                         f"{setting} | {_verdict(q)} | {_ratio(q)} | {_ratio(r.get('cpu_ratio'))} |")
    for run, info in runs.items():
        for key, dtype in (("encoder", "float32"), ("encoder_bfloat16", "bfloat16"), ("encoder_onnx", "float32 onnx")):
            if info.get(key) and (key != "encoder_bfloat16" or "fused_check" in info):  # bfloat16: from run 4 on
                e = info[key]["ratio"]
                lines.append(f"| {run} | floor of any mode with `sim` on one core: 1 + question encoding <= "
                             f"{QUERY_TARGET:g} | {dtype} encoder | {'yes' if 1 + e[0] <= QUERY_TARGET else 'no'} | "
                             f"1 + {e[0]:.3f} [{e[1]:.3f}, {e[2]:.3f}] | – |")
    return lines


def _encoder_label(row: dict) -> str:
    """The encoder column: the weights' dtype, and the runtime where it is not torch."""
    backend = row.get("encoder_backend", "torch")
    return row.get("encoder_dtype", "float32") + ("" if backend == "torch" else f" {backend}")


def _verdict(q) -> str:
    """Whether a query-cost ratio ``[value, low, high]`` meets :data:`QUERY_TARGET`: by its point estimate, and
    'within the interval' where the interval reaches past the target on the other side."""
    met = q[0] <= QUERY_TARGET
    if met and q[2] > QUERY_TARGET:
        return "yes (point; interval reaches above)"
    if not met and q[1] <= QUERY_TARGET:
        return "no (point; interval reaches below)"
    return "yes" if met else "no"
