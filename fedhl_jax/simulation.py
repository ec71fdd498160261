"""The simulation engine: model + data + algorithm → jitted rounds.

One round (one compiled call, whatever clients are sampled and whatever their
ranks): broadcast (the algorithm's truncation) → ``K`` local steps for every
sampled client in one ``jax.vmap`` (or chunks of it) → aggregate.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedhl_jax import model as M
from fedhl_jax.algorithms import Algorithm, make_algorithm
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.data import batching, labels as data_labels, loading, partition as data_partition, prompts
from fedhl_jax.local import make_clients_train, make_local_train, make_optimizer
from fedhl_jax.lora import Adapter, lora_scale, rank_mask

REPO = Path(__file__).resolve().parents[1]
SHARED_MODEL = REPO.parent / "shared" / "models" / "stories260K-hf"
HUB_MODEL = "karpathy/tinyllamas (stories260K, converted)"
_PARTITION_KIND = {"iid": "iid", "dirichlet": "dirichlet", "meta": "meta", "quantity_skew": "quantity",
                   "rank_correlated": "rank"}
_EVAL_SPLIT = {"gsm8k": "test"}  # others: a held-out slice of the training file


# --------------------------------------------------------------------------- ranks


def client_ranks(fed, seed: int) -> np.ndarray:
    """Each client's LoRA rank, fixed for the run.

    ``list``: ``fed.ranks`` cycled over the clients; ``uniform``: uniform over the
    set; ``heavy_tail_low`` / ``heavy_tail_high``: probability ``∝ 2^-k`` for the
    ``k``-th smallest / largest rank; ``homogeneous``: every client at ``max(fed.ranks)``.

    Returns:
      ``[num_clients]`` int32.
    """
    values = np.array(sorted(set(fed.ranks)), np.int32)
    n = fed.num_clients
    rng = np.random.default_rng([seed, 0x2A4C])
    kind = fed.rank_distribution
    if kind == "list":
        return np.resize(np.asarray(fed.ranks, np.int32), n)
    if kind == "homogeneous":
        return np.full(n, values[-1], np.int32)
    if kind == "uniform":
        return rng.choice(values, size=n).astype(np.int32)
    w = 0.5 ** np.arange(len(values))
    if kind == "heavy_tail_high":
        w = w[::-1]
    return rng.choice(values, size=n, p=w / w.sum()).astype(np.int32)


# --------------------------------------------------------------------------- model and data


def load_model(cfg: TrainConfig, texts_for_fallback: list[str]):
    """``(model_cfg, params, tokenizer, description)`` following ``model.name_or_path``."""
    mc = cfg.model
    name = mc.name_or_path
    if name == "auto":
        name = str(SHARED_MODEL) if SHARED_MODEL.exists() else "random"
    if name != "random":
        model_cfg, params = M.load_pretrained(name, dtype=mc.dtype)
        tokenizer = M.load_tokenizer(name)
        return model_cfg, params, tokenizer, f"pretrained {name}"
    from fedhl_jax.data.toy_tokenizer import word_level_tokenizer

    tokenizer = word_level_tokenizer(texts_for_fallback)
    model_cfg = M.LlamaConfig(vocab_size=len(tokenizer), hidden_size=mc.random_hidden_size,
                              intermediate_size=mc.random_intermediate_size, num_layers=mc.random_num_layers,
                              num_heads=mc.random_num_heads, num_kv_heads=mc.random_num_kv_heads,
                              head_dim=mc.random_hidden_size // mc.random_num_heads, dtype=mc.dtype,
                              bos_token_id=1, eos_token_id=2)
    params = M.init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
    return model_cfg, params, tokenizer, (f"random-init Llama (hidden {mc.random_hidden_size}, "
                                          f"{mc.random_num_layers} layers) with a word-level tokenizer")


def load_records(cfg: TrainConfig, log: Callable):
    """Train and held-out records, choosing local files or the Hub (``data.source``)."""
    dc = cfg.data
    source, path = "local", None
    if dc.source == "hub":
        source = "hub"
    elif dc.source != "auto":
        path = dc.source
    if dc.source == "auto":
        try:
            loading.resolve_data_dir(dc.data_dir)
        except loading.DataError:
            source = "hub"
    common = dict(name=dc.dataset, source=source, data_dir=dc.data_dir)
    train_cfg = loading.DataConfig(**common, path=path)
    where = (f"Hub id {loading.HUB_DEFAULTS[dc.dataset][0]}" if source == "hub"
             else f"local files in {path or loading.resolve_data_dir(dc.data_dir)}")
    log(f"data: {dc.dataset} from {where}")
    train = loading.load_instruction_dataset(train_cfg)
    split = _EVAL_SPLIT.get(dc.dataset)
    if split is not None and path is None:
        test = loading.load_instruction_dataset(loading.DataConfig(**common, split=split))
        if dc.eval_examples:
            test = test.select(range(min(dc.eval_examples, len(test))))
    else:  # hold out the last eval_examples rows of a seeded shuffle
        order = np.random.default_rng([cfg.seed, 0xE7A1]).permutation(len(train))
        n_eval = min(dc.eval_examples, max(len(train) // 5, 1)) if dc.eval_examples else 0
        test = train.select(order[len(order) - n_eval:]) if n_eval else None
        train = train.select(np.sort(order[: len(order) - n_eval]))
    if dc.max_train_examples is not None and len(train) > dc.max_train_examples:
        train = train.select(range(dc.max_train_examples))
    return train, test


@dataclasses.dataclass
class RoundOutput:
    state: object
    metrics: dict


class Simulation:
    """Everything a run needs, built and validated before any training.

    Args:
      cfg: the run's config.
      log: where progress messages go.
    """

    def __init__(self, cfg: TrainConfig, *, log: Callable = print):
        self.cfg = cfg
        self.log = log
        fed, dc = cfg.fed, cfg.data
        train_records, eval_records = load_records(cfg, log)
        if fed.num_clients > len(train_records):
            raise ConfigError(f"fed.num_clients={fed.num_clients} is more than the {len(train_records)} training "
                              f"examples of {dc.dataset}")
        texts = [" ".join(r.values()) for r in train_records.select(range(min(len(train_records), 2000)))]
        self.model_cfg, self.params, self.tokenizer, desc = load_model(cfg, texts)
        log(f"model: {desc}")
        self.shapes = M.lora_targets(self.model_cfg, cfg.model.targets)
        self.ranks = client_ranks(fed, cfg.seed)
        smallest = min(min(s) for s in self.shapes.values())
        if fed.r_max > smallest:
            raise ConfigError(f"rank {fed.r_max} in fed.ranks exceeds min(d_out, d_in)={smallest} of the "
                              f"LoRA modules {sorted({m.split('.')[-1] for m in self.shapes})}")
        self.alg: Algorithm = make_algorithm(fed.algorithm, fed.r_max, **self._alg_options())
        self.alg.check_ranks(self.ranks)

        # Data: tokenise once, partition, batch per round with static shapes.
        self.train = prompts.tokenize_dataset(train_records, self.tokenizer, dc.seq_len)
        log(f"train: {self.train.truncation_report()}")
        if fed.num_clients > len(self.train):
            raise ConfigError(f"fed.num_clients={fed.num_clients} is more than the {len(self.train)} training examples "
                              f"of {dc.dataset} that fit data.seq_len={dc.seq_len}")
        kind = _PARTITION_KIND[dc.partition]
        self.labels = data_labels.dataset_labels(dc.dataset, train_records, dc.label_kind)[self.train.source_index]
        pcfg = data_partition.PartitionConfig(
            kind=kind, num_clients=fed.num_clients, seed=cfg.seed, alpha=dc.dirichlet_alpha,
            ranks=tuple(int(r) for r in self.ranks) if kind == "rank" else None, label_kind=dc.label_kind)
        self.partitions = data_partition.make_partition(pcfg, len(self.train), self.labels)
        self.partition_summary = data_partition.partition_summary(self.partitions, self.labels,
                                                                  tuple(int(r) for r in self.ranks))
        self.num_examples = np.array([len(p) for p in self.partitions], np.float32)
        self.batcher = batching.RoundBatcher(self.train.tokens, self.train.loss_mask, self.partitions,
                                             local_steps=cfg.optim.local_steps, batch_size=cfg.optim.batch_size,
                                             seed=cfg.seed)
        self.eval = (prompts.tokenize_dataset(eval_records, self.tokenizer, dc.seq_len)
                     if eval_records is not None and len(eval_records) else None)
        self._build_functions()

    def _alg_options(self) -> dict:
        fed = self.cfg.fed
        if fed.algorithm == "fedhl":
            return dict(eps=fed.eps, eps_mode=fed.eps_mode, power=fed.power, weighting=fed.weighting,
                        per_module=fed.per_module, split=fed.split, svd_method=fed.svd_method)
        if fed.algorithm == "flexlora":
            return dict(split=fed.split, svd_method=fed.svd_method)
        return {}

    # ---------------------------------------------------------------- compiled functions
    def _build_functions(self):
        cfg, model_cfg, alg = self.cfg, self.model_cfg, self.alg
        o = cfg.optim
        optimizer = make_optimizer(o.optimizer, o.lr, lr_b=o.lr_b, weight_decay=o.weight_decay, momentum=o.momentum,
                                   grad_clip=o.grad_clip, trainable=alg.trainable)
        loss = lambda params, adapter, tokens, mask: M.loss_fn(model_cfg, params, adapter, tokens, mask)
        local_train = make_local_train(loss, optimizer, remat=cfg.fed.remat)

        def client_step(params, shared, per_client, mask, scale, tokens, loss_mask):
            # The client builds its starting factors from the broadcast (its slice of the SVD), then trains.
            B, A = alg.materialize(shared, per_client, mask)
            return local_train(params, Adapter(B, A, mask, scale), tokens, loss_mask)

        clients_train = make_clients_train(client_step, clients_per_chunk=cfg.fed.clients_per_chunk, n_shared=2)

        def round_step(state, params, mask, scale, num_examples, tokens, loss_mask, key):
            plan = alg.plan(state, mask, scale, key)  # server: O(r_max) per client on top of shared arrays
            if plan.base_delta is not None:
                params = M.merge_delta(params, plan.base_delta)
            trained, losses = clients_train(params, plan.shared, plan.per_client, mask, scale, tokens,
                                            loss_mask)  # losses [n, K]
            state, info = alg.aggregate(state, trained.B, trained.A, mask, scale, num_examples)
            return state, info, losses

        def eval_sums(params, delta, tokens, loss_mask):
            return M.token_losses(model_cfg, M.merge_delta(params, delta), None, tokens, loss_mask)

        self.round_fn = jax.jit(round_step)
        self.eval_fn = jax.jit(eval_sums)
        n_dev = jax.device_count()
        self.mesh = None
        if n_dev > 1 and self.cfg.fed.clients_per_round % n_dev == 0:
            self.mesh = Mesh(np.array(jax.devices()), ("clients",))
            self.log(f"sharding the client axis over {n_dev} devices")

    def _shard(self, *arrays):
        """Places arrays with a leading client axis on the ``clients`` mesh axis."""
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(a, NamedSharding(self.mesh, P("clients"))) for a in arrays)

    # ---------------------------------------------------------------- rounds
    def init_state(self):
        return self.alg.init(self.shapes, jax.random.PRNGKey(self.cfg.seed))

    def sample(self, t: int) -> np.ndarray:
        return batching.sample_clients(self.cfg.fed.num_clients, self.cfg.fed.clients_per_round, t, self.cfg.seed)

    def comm_bytes(self, ranks: np.ndarray) -> tuple[int, int]:
        """Bytes sent down and up in a round (float32 factors of the active ranks)."""
        per_rank = sum(d_out + d_in for d_out, d_in in self.shapes.values()) * 4
        up_rank = per_rank if "A" in self.alg.trainable else sum(d for d, _ in self.shapes.values()) * 4
        down = int(per_rank * ranks.sum())
        if self.alg.name == "flora":  # everyone also receives the round's stacked factors to merge
            down += int(per_rank * ranks.sum() * len(ranks))
        return down, int(up_rank * ranks.sum())

    def run_round(self, state, t: int) -> RoundOutput:
        t0 = time.perf_counter()
        ids = self.sample(t)
        ranks = self.ranks[ids]
        mask = rank_mask(ranks, self.cfg.fed.r_max)
        scale = lora_scale(ranks, self.cfg.model.alpha, rslora=self.cfg.model.rslora)
        tokens, loss_mask = self.batcher(t, ids)
        mask, scale, num_ex, tokens, loss_mask = self._shard(mask, scale, jnp.asarray(self.num_examples[ids]),
                                                             jnp.asarray(tokens), jnp.asarray(loss_mask))
        key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), t)
        state, info, losses = self.round_fn(state, self.params, mask, scale, num_ex, tokens, loss_mask, key)
        losses = np.asarray(losses)
        down, up = self.comm_bytes(ranks)
        metrics = {
            "round": t, "clients": ids, "ranks": ranks,
            "train_loss": float(losses.mean()), "train_loss_first_step": float(losses[:, 0].mean()),
            "train_loss_last_step": float(losses[:, -1].mean()),
            "p": np.asarray(info["p"]), "excluded": int((~np.asarray(info["valid"])).sum()),
            "bytes_down": down, "bytes_up": up,
        }
        if "errors" in info:
            metrics["trunc_error"] = np.asarray(info["errors"])
        metrics["seconds"] = time.perf_counter() - t0
        return RoundOutput(state, metrics)

    # ---------------------------------------------------------------- evaluation
    def global_delta(self, state) -> dict:
        return self.alg.global_delta(state)

    def evaluate(self, state) -> dict:
        """Held-out loss/perplexity of the global model (and per rank, and generation metrics if enabled)."""
        if self.eval is None:
            return {}
        from fedhl_jax import evaluation

        ec = self.cfg.eval
        out = {}

        def loss_of(delta):
            return evaluation.heldout_loss(lambda t, m: self.eval_fn(self.params, delta, t, m),
                                           self.eval.tokens, self.eval.loss_mask, ec.batch_size)

        delta = self.global_delta(state)
        res = loss_of(delta)
        out["eval_loss"], out["eval_ppl"] = res["loss"], res["ppl"]
        if ec.per_rank and self.alg.name in ("fedhl", "flexlora"):
            for r in sorted(set(self.ranks.tolist())):
                mask = rank_mask([r], self.cfg.fed.r_max)
                scale = lora_scale([r], self.cfg.model.alpha, rslora=self.cfg.model.rslora)
                start = self.alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))
                trunc = {k: scale[0] * start.B[k][0] @ start.A[k][0] for k in start.B}
                out[f"eval_loss_rank{r}"] = loss_of(trunc)["loss"]
        if ec.generate_examples:
            out.update(self.generation_metrics(delta))
        return out

    def generation_metrics(self, delta, n: int | None = None) -> dict:
        """Exact match (GSM8K) or ROUGE-L (others) of greedy answers to the first ``n`` held-out prompts."""
        from fedhl_jax import evaluation

        ec = self.cfg.eval
        n = min(ec.generate_examples if n is None else n, len(self.eval))
        params = M.merge_delta(self.params, delta)
        eos = self.tokenizer.eos_token_id

        def gen(batch):
            toks = M.generate(self.model_cfg, params, [list(map(int, p)) for p in batch],
                              max_new_tokens=ec.max_new_tokens, eos_id=eos)
            return [self.tokenizer.decode(r, skip_special_tokens=True) for r in M.strip_after_eos(toks, eos)]

        metric = "exact_match" if self.cfg.data.dataset == "gsm8k" else "rouge_l"
        res = evaluation.generation_eval(gen, self.eval.prompt_ids[:n], self.eval.references[:n], metric,
                                         batch_size=min(n, ec.batch_size))
        return {f"eval_{metric}": res["score"], "eval_sample": res["predictions"][0] if n else ""}
