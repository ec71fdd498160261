"""Evaluation of the global model of a run: held-out loss, per-rank truncations, generation."""

from __future__ import annotations

import jax

from fedhl_jax import metrics, runtime
from fedhl_jax import model as M
from fedhl_jax.algorithms import Algorithm
from fedhl_jax.data.prompts import TokenizedDataset
from fedhl_jax.data.registry import dataset_spec
from fedhl_jax.lora import lora_scale, rank_mask


class GlobalEvaluator:
    """Evaluates the server state's global adapter on the held-out set.

    Args:
      model_cfg, params, tokenizer: the base model.
      data: the tokenised held-out rows.
      algorithm: the run's algorithm (its ``global_delta``; per-rank views when ``per_rank_eval``).
      ranks: the ranks that clients of the run hold (for per-rank evaluation).
      eval_cfg: ``EvalConfig``.
      metric: ``exact_match`` or ``rouge_l`` for generation.
      alpha, rslora, r_max: LoRA scale and padded rank.
      validation: tokenised validation rows (their loss is ``eval_val_loss``), or None.
    """

    def __init__(self, model_cfg, params, tokenizer, data: TokenizedDataset, algorithm: Algorithm, ranks, eval_cfg,
                 metric: str, *, alpha: float, rslora: bool, r_max: int, validation: TokenizedDataset | None = None):
        self.model_cfg, self.params, self.tokenizer, self.data = model_cfg, params, tokenizer, data
        self.algorithm, self.cfg, self.metric = algorithm, eval_cfg, metric
        self.ranks = sorted(set(int(r) for r in ranks))
        self.alpha, self.rslora, self.r_max = alpha, rslora, r_max
        n_loss = len(data) if eval_cfg.loss_examples is None else min(eval_cfg.loss_examples, len(data))
        self.loss_tokens, self.loss_mask = data.tokens[:n_loss], data.loss_mask[:n_loss]
        self.validation = validation
        per_example = eval_cfg.per_example
        self.loss_fn = runtime.jit(lambda p, delta, t, m: M.token_losses(model_cfg, M.merge_delta(p, delta), None, t, m,
                                                                         per_example=per_example))
        # Generation shapes fixed for the run: one prompt width (the longest prompt, rounded up to 32)
        # and one batch size, so the decode program compiles once, not once per batch.
        self.n_generate = min(eval_cfg.generate_examples, len(data))
        self.generate_batch = min(self.n_generate, eval_cfg.generate_batch_size or eval_cfg.batch_size)
        lengths = data.prompt_lengths[: self.n_generate]
        self.prompt_width = int(-(-int(lengths.max()) // 32) * 32) if self.n_generate else 0

    def loss(self, delta: dict, *, validation: bool = False) -> dict:
        """``{"loss", "ppl"}`` (and ``"per_example"`` with ``eval.per_example``) of the base plus ``delta``
        on the held-out response tokens, or on the validation rows' with ``validation``."""
        tokens, mask = ((self.validation.tokens, self.validation.loss_mask) if validation
                        else (self.loss_tokens, self.loss_mask))
        return metrics.heldout_loss(lambda t, m: self.loss_fn(self.params, delta, t, m), tokens, mask,
                                    self.cfg.batch_size, length_bucket=self.cfg.length_bucket)

    def __call__(self, state, key: jax.Array, *, generate: bool = True) -> dict:
        """``eval_loss``, ``eval_ppl``, ``eval_val_loss`` (with a validation split), per-example losses
        (``eval.per_example``), per-rank ``eval_loss_rank{r}`` and (with ``generate``) generation metrics
        as configured."""
        delta = self.algorithm.global_delta(state)
        res = self.loss(delta)
        out = {"eval_loss": res["loss"], "eval_ppl": res["ppl"]}
        if "per_example" in res:
            out["eval_loss_examples"] = res["per_example"].tolist()
        if self.validation is not None and self.cfg.validation:
            val = self.loss(delta, validation=True)
            out["eval_val_loss"] = val["loss"]
            if "per_example" in val:
                out["eval_val_loss_examples"] = val["per_example"].tolist()
        if self.cfg.per_rank and self.algorithm.per_rank_eval:
            for r in self.ranks:
                mask = rank_mask([r], self.r_max)
                scale = lora_scale([r], self.alpha, rslora=self.rslora)
                start = self.algorithm.broadcast(state, mask, scale, key)
                out[f"eval_loss_rank{r}"] = self.loss({k: scale[0] * start.B[k][0] @ start.A[k][0]
                                                       for k in start.B})["loss"]
        if generate and self.n_generate:
            out.update(self.generation(delta))
        return out

    def generation(self, delta: dict, n: int | None = None) -> dict:
        """Exact match (GSM8K) or ROUGE-L (others) of greedy answers to the first ``n`` held-out prompts.

        Returns ``eval_<metric>`` (the mean), ``eval_<metric>_examples`` (``[n]`` per-answer scores,
        for paired intervals over answers), ``eval_generated`` (n) and ``eval_sample`` (one answer).

        Every batch has the run's fixed prompt width and batch size (``generation_eval`` fills the
        last one with copies of its last prompt and drops their answers), so generation compiles
        once per run.
        """
        ec = self.cfg
        n = self.n_generate if n is None else min(n, self.n_generate)
        params = M.merge_delta(self.params, delta)
        eos = self.tokenizer.eos_token_id

        def gen(batch):
            toks = M.generate(self.model_cfg, params, [list(map(int, p)) for p in batch],
                              max_new_tokens=ec.max_new_tokens, eos_id=eos, pad_to=self.prompt_width)
            return [self.tokenizer.decode(r, skip_special_tokens=True) for r in M.strip_after_eos(toks, eos)]

        res = metrics.generation_eval(gen, self.data.prompt_ids[:n], self.data.references[:n], self.metric,
                                         batch_size=self.generate_batch)
        return {f"eval_{self.metric}": res["score"], "eval_generated": n,
                f"eval_{self.metric}_examples": [round(float(x), 6) for x in res["scores"]],
                "eval_sample": res["predictions"][0] if n else ""}


def eval_metric(dataset: str) -> str:
    """The generation metric of a dataset (its spec's ``metric``: exact match for GSM8K, ROUGE-L for the others)."""
    return dataset_spec(dataset).metric
