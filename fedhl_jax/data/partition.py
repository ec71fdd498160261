"""Splitting a dataset's example indices across federated clients.

Every partitioner returns ``list[np.ndarray]``: one sorted int64 index array
per client, pairwise disjoint, together covering all ``N`` examples, every
client holding at least one example. All are deterministic functions of their
arguments and ``seed``. Asking for more clients than examples raises
:class:`~fedhl_jax.data.loading.DataError`.

Partitioners:

``iid``
    A seeded permutation cut into ``num_clients`` near-equal parts (sizes
    differ by at most one).
``dirichlet``
    For every label ``c`` a client mixture ``p_c ~ Dirichlet(alpha * 1)`` is
    drawn and the (shuffled) examples of ``c`` are cut by the cumulative
    ``p_c``. Small ``alpha`` gives clients few labels; large ``alpha``
    approaches IID. Clients left empty then take one random example from the
    currently largest client (repeated until none is empty).
``meta``
    One label per client. Labels are ordered by frequency (ties by name).
    With ``num_clients >= L`` labels, each label gets one client and the
    remaining clients go, one at a time, to the label with the most examples
    per assigned client (never more clients than examples); a label's
    examples are split evenly among its clients. With ``num_clients < L``,
    labels are dealt round-robin, so each client holds a disjoint group of
    labels. The label->client mapping is shuffled with ``seed``.
``quantity_skew``
    Label-blind, skewed sizes: proportions ``p ~ Dirichlet(alpha * 1)``
    (``method="dirichlet"``) or ``p_k ∝ (k + 1) ** -exponent`` in a shuffled
    client order (``method="power_law"``). Each client gets one example plus
    a largest-remainder share of the other ``N - C``.
``rank_correlated``
    Rank-correlated split for heterogeneous LoRA ranks, rule:

    1. Clients are ordered by ``(rank, client id)``. The *private* clients are
       the first ``num_private_clients`` of them; by default all clients
       sharing the lowest rank (an error when every client has the same rank
       and the count is not given).
    2. The *private* labels are ``private_labels`` when given, else the
       ``num_private_labels`` least frequent labels (ties by name); by
       default ``min(num_private_clients, L - 1)`` of them.
    3. Examples of private labels are split among the private clients with
       the ``meta`` rule (one label per client when there are enough
       clients).
    4. Examples of the other (shared) labels are split IID among the other
       clients, or among all clients when ``share_with_private=True``.

    So no client outside the lowest-rank group holds any example of a
    private label.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedhl_jax.data.loading import DataError

__all__ = [
    "PARTITION_KINDS",
    "PartitionConfig",
    "RENAMED_PARTITIONS",
    "PartitionSummary",
    "dirichlet_partition",
    "format_partition_summary",
    "iid_partition",
    "label_skew",
    "make_partition",
    "meta_partition",
    "partition_summary",
    "plot_partition_summary",
    "quantity_skew_partition",
    "rank_correlated_partition",
    "validate_partition",
]

#: Names accepted by :func:`make_partition`.
PARTITION_KINDS = ("iid", "dirichlet", "meta", "quantity_skew", "rank_correlated")
# Names used before the vocabulary was unified (an error names the new one).
RENAMED_PARTITIONS = {"quantity": "quantity_skew", "rank": "rank_correlated"}


def _check_sizes(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < 1:
        raise DataError("cannot partition an empty dataset (0 examples)")
    if num_clients > num_examples:
        raise DataError(
            f"more clients than examples: {num_clients} clients but only {num_examples} "
            "examples (every client needs at least one)"
        )


def _as_labels(labels: Sequence[Any], classes: Sequence[str] | None = None) -> np.ndarray:
    arr = np.asarray([str(x) for x in labels], dtype=object)
    if classes is not None:
        known = set(map(str, classes))
        bad = [i for i, x in enumerate(arr) if x not in known]
        if bad:
            raise DataError(
                f"unknown label {arr[bad[0]]!r} at example {bad[0]} (known labels: {sorted(known)})"
            )
    return arr


def _sorted_classes(labels: np.ndarray) -> list[str]:
    """Distinct labels, most frequent first, ties by name."""
    vals, counts = np.unique(labels.astype(str), return_counts=True)
    return [str(vals[i]) for i in sorted(range(len(vals)), key=lambda i: (-counts[i], vals[i]))]


def _from_assignment(assign: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(num_clients + 1))
    return [order[bounds[k]: bounds[k + 1]].astype(np.int64) for k in range(num_clients)]


def _fill_empty(assign: np.ndarray, num_clients: int, rng: np.random.Generator) -> None:
    """Moves one random example from the largest client to each empty client."""
    sizes = np.bincount(assign, minlength=num_clients)
    for k in np.nonzero(sizes == 0)[0]:
        donor = int(np.argmax(sizes))
        pick = rng.choice(np.nonzero(assign == donor)[0])
        assign[pick] = k
        sizes[donor] -= 1
        sizes[k] += 1


def _largest_remainder(total: int, p: np.ndarray) -> np.ndarray:
    raw = p / p.sum() * total
    base = np.floor(raw).astype(np.int64)
    rest = total - int(base.sum())
    if rest:
        base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


def validate_partition(partitions: Sequence[np.ndarray], num_examples: int) -> None:
    """Checks that partitions are non-empty, disjoint and cover ``range(num_examples)``.

    Args:
        partitions: One index array per client.
        num_examples: ``N``.

    Raises:
        DataError: Naming the first empty client, out-of-range or repeated
            index, or the number of uncovered examples.
    """
    seen = np.zeros(num_examples, dtype=np.int64)
    for k, part in enumerate(partitions):
        part = np.asarray(part)
        if part.size == 0:
            raise DataError(f"client {k} has no examples")
        if part.min() < 0 or part.max() >= num_examples:
            raise DataError(f"client {k} has an index outside [0, {num_examples})")
        np.add.at(seen, part, 1)
    if (seen > 1).any():
        raise DataError(f"example {int(np.argmax(seen > 1))} is assigned to more than one client")
    if (seen == 0).any():
        raise DataError(f"{int((seen == 0).sum())} examples are assigned to no client")


def iid_partition(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform random split into near-equal parts.

    Args:
        num_examples: ``N``.
        num_clients: ``C <= N``.
        seed: RNG seed.

    Returns:
        ``C`` sorted int64 index arrays with sizes ``N // C`` or ``N // C + 1``.
    """
    _check_sizes(num_examples, num_clients)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: Sequence[Any],
    num_clients: int,
    alpha: float,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Label-skewed split with per-label Dirichlet(``alpha``) client mixtures.

    Args:
        labels: ``[N]`` per-example labels.
        num_clients: ``C <= N``.
        alpha: Dirichlet concentration (> 0); smaller is more skewed.
        seed: RNG seed.
        classes: Optional list of allowed labels; a label outside it raises.

    Returns:
        ``C`` sorted int64 index arrays.

    Raises:
        DataError: ``alpha <= 0``, too many clients, or an unknown label.
    """
    lab = _as_labels(labels, classes)
    n = len(lab)
    _check_sizes(n, num_clients)
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    assign = np.empty(n, dtype=np.int64)
    for c in sorted(set(lab)):
        idx = np.nonzero(lab == c)[0]
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha
            p = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for k, part in enumerate(np.split(idx, cuts)):
            assign[part] = k
    _fill_empty(assign, num_clients, rng)
    return _from_assignment(assign, num_clients)


def _meta_assign(
    lab: np.ndarray, idx: np.ndarray, clients: np.ndarray, rng: np.random.Generator,
    assign: np.ndarray,
) -> None:
    """Meta rule on examples ``idx`` for client ids ``clients`` (writes ``assign``)."""
    sub = lab[idx]
    classes = _sorted_classes(sub)
    counts = {c: int((sub == c).sum()) for c in classes}
    n_c, n_l = len(clients), len(classes)
    clients = clients[rng.permutation(n_c)]
    if n_c >= n_l:
        per = {c: 1 for c in classes}
        for _ in range(n_c - n_l):
            open_ = [c for c in classes if counts[c] > per[c]]
            best = max(open_, key=lambda c: (counts[c] / per[c], -classes.index(c)))
            per[best] += 1
        k = 0
        for c in classes:
            members = idx[sub == c].copy()
            rng.shuffle(members)
            for part in np.array_split(members, per[c]):
                assign[part] = clients[k]
                k += 1
    else:
        for j, c in enumerate(classes):
            assign[idx[sub == c]] = clients[j % n_c]


def meta_partition(
    labels: Sequence[Any],
    num_clients: int,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """One label per client (disjoint label groups when clients < labels).

    Args:
        labels: ``[N]`` per-example labels.
        num_clients: ``C <= N``.
        seed: RNG seed (shuffles the label->client mapping and the split
            within a label).
        classes: Optional list of allowed labels; a label outside it raises.

    Returns:
        ``C`` sorted int64 index arrays; each label's examples all lie on
        clients that hold no other label when ``C >= L``.

    Raises:
        DataError: Too many clients or an unknown label.
    """
    lab = _as_labels(labels, classes)
    n = len(lab)
    _check_sizes(n, num_clients)
    rng = np.random.default_rng(seed)
    assign = np.empty(n, dtype=np.int64)
    _meta_assign(lab, np.arange(n), np.arange(num_clients), rng, assign)
    return _from_assignment(assign, num_clients)


def quantity_skew_partition(
    num_examples: int,
    num_clients: int,
    seed: int = 0,
    *,
    method: str = "dirichlet",
    alpha: float = 0.5,
    exponent: float = 1.0,
) -> list[np.ndarray]:
    """Label-blind split with skewed client sizes.

    Args:
        num_examples: ``N``.
        num_clients: ``C <= N``.
        seed: RNG seed.
        method: ``"dirichlet"`` (sizes from ``Dirichlet(alpha)``) or
            ``"power_law"`` (size of the ``k``-th client, in a shuffled order,
            proportional to ``(k + 1) ** -exponent``).
        alpha: Dirichlet concentration (> 0) for ``method="dirichlet"``.
        exponent: Power-law exponent (>= 0) for ``method="power_law"``.

    Returns:
        ``C`` sorted int64 index arrays, each with at least one example.

    Raises:
        DataError: Unknown method, bad ``alpha``/``exponent`` or too many
            clients.
    """
    _check_sizes(num_examples, num_clients)
    rng = np.random.default_rng(seed)
    if method == "dirichlet":
        if not alpha > 0:
            raise DataError(f"quantity-skew alpha must be > 0, got {alpha}")
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:
            p = np.eye(num_clients)[rng.integers(num_clients)]
    elif method == "power_law":
        if exponent < 0:
            raise DataError(f"power-law exponent must be >= 0, got {exponent}")
        p = (np.arange(1, num_clients + 1, dtype=np.float64) ** -float(exponent))[
            rng.permutation(num_clients)
        ]
    else:
        raise DataError(f"unknown quantity-skew method {method!r}; expected 'dirichlet' or 'power_law'")
    sizes = 1 + _largest_remainder(num_examples - num_clients, p)
    perm = rng.permutation(num_examples)
    return [np.sort(p).astype(np.int64) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def rank_correlated_partition(
    labels: Sequence[Any],
    ranks: Sequence[int],
    seed: int = 0,
    *,
    num_private_clients: int | None = None,
    num_private_labels: int | None = None,
    private_labels: Sequence[str] | None = None,
    share_with_private: bool = False,
    classes: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Gives labels that no one else holds to the lowest-rank clients.

    See the module docstring for the exact rule.

    Args:
        labels: ``[N]`` per-example labels.
        ranks: ``[C]`` LoRA rank of each client (``C = len(ranks)``).
        seed: RNG seed.
        num_private_clients: Size of the lowest-rank group (default: the
            number of clients with the minimum rank).
        num_private_labels: Number of private labels (default
            ``min(num_private_clients, L - 1)``); ignored with
            ``private_labels``.
        private_labels: Explicit private labels.
        share_with_private: Also give shared-label examples to the private
            clients.
        classes: Optional list of allowed labels; a label outside it raises.

    Returns:
        ``C`` sorted int64 index arrays.

    Raises:
        DataError: Too many clients, fewer than two labels, an unknown label
            in ``private_labels`` (or ``labels``), equal ranks without
            ``num_private_clients``, or too few examples on either side.
    """
    lab = _as_labels(labels, classes)
    n = len(lab)
    c = len(ranks)
    _check_sizes(n, c)
    all_classes = _sorted_classes(lab)
    if len(all_classes) < 2:
        raise DataError(f"rank-correlated partition needs >= 2 labels, got {all_classes}")
    ranks_arr = np.asarray(ranks)
    order = np.lexsort((np.arange(c), ranks_arr))  # by rank, then client id
    if num_private_clients is None:
        num_private_clients = int((ranks_arr == ranks_arr.min()).sum())
        if num_private_clients == c:
            raise DataError(
                f"all {c} clients have rank {ranks_arr.min()}; pass num_private_clients"
            )
    if not 1 <= num_private_clients < c:
        raise DataError(f"num_private_clients must be in [1, {c - 1}], got {num_private_clients}")
    private_clients = np.sort(order[:num_private_clients])
    other_clients = np.sort(order[num_private_clients:])

    if private_labels is not None:
        unknown = [x for x in private_labels if str(x) not in all_classes]
        if unknown:
            raise DataError(
                f"unknown label {unknown[0]!r} in private_labels (known labels: {sorted(all_classes)})"
            )
        priv = [str(x) for x in private_labels]
    else:
        k = num_private_labels if num_private_labels is not None else min(
            num_private_clients, len(all_classes) - 1
        )
        if not 1 <= k < len(all_classes):
            raise DataError(
                f"num_private_labels must be in [1, {len(all_classes) - 1}], got {k}"
            )
        freq = {x: int((lab == x).sum()) for x in all_classes}
        priv = sorted(all_classes, key=lambda x: (freq[x], x))[:k]  # least frequent
    if len(set(priv)) >= len(all_classes):
        raise DataError("private_labels must leave at least one shared label")

    priv_set = set(priv)
    is_priv = np.fromiter((x in priv_set for x in lab), dtype=bool, count=n)
    priv_idx, shared_idx = np.nonzero(is_priv)[0], np.nonzero(~is_priv)[0]
    receivers = np.arange(c) if share_with_private else other_clients
    if len(priv_idx) < num_private_clients:
        raise DataError(
            f"private labels {priv} have {len(priv_idx)} examples for "
            f"{num_private_clients} private clients"
        )
    if len(shared_idx) < len(receivers):
        raise DataError(
            f"shared labels have {len(shared_idx)} examples for {len(receivers)} clients"
        )
    rng = np.random.default_rng(seed)
    assign = np.empty(n, dtype=np.int64)
    _meta_assign(lab, priv_idx, private_clients, rng, assign)
    perm = shared_idx[rng.permutation(len(shared_idx))]
    for k, part in zip(receivers, np.array_split(perm, len(receivers))):
        assign[part] = k
    return _from_assignment(assign, c)


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """How to partition a dataset.

    Attributes:
        kind: One of :data:`PARTITION_KINDS`.
        num_clients: ``C`` (for ``kind="rank_correlated"`` it must equal ``len(ranks)``).
        seed: RNG seed.
        alpha: Dirichlet concentration for ``dirichlet`` and ``quantity_skew``.
        quantity_method: ``"dirichlet"`` or ``"power_law"``.
        exponent: Power-law exponent.
        ranks: Client LoRA ranks for ``kind="rank_correlated"``.
        num_private_clients: See :func:`rank_correlated_partition`.
        num_private_labels: See :func:`rank_correlated_partition`.
        private_labels: See :func:`rank_correlated_partition`.
        share_with_private: See :func:`rank_correlated_partition`.
        label_kind: Label kind for label-based partitions (``None``: the
            dataset's default; see :mod:`fedhl_jax.data.labels`).
    """

    kind: str = "iid"
    num_clients: int = 10
    seed: int = 0
    alpha: float = 0.5
    quantity_method: str = "dirichlet"
    exponent: float = 1.0
    ranks: tuple[int, ...] | None = None
    num_private_clients: int | None = None
    num_private_labels: int | None = None
    private_labels: tuple[str, ...] | None = None
    share_with_private: bool = False
    label_kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind in RENAMED_PARTITIONS:
            raise DataError(f"partition kind {self.kind!r} is now called {RENAMED_PARTITIONS[self.kind]!r}")
        if self.kind not in PARTITION_KINDS:
            raise DataError(f"unknown partition kind {self.kind!r}; expected one of {list(PARTITION_KINDS)}")
        if self.kind == "rank_correlated":
            if self.ranks is None:
                raise DataError("partition kind 'rank_correlated' needs ranks")
            if len(self.ranks) != self.num_clients:
                raise DataError(
                    f"len(ranks)={len(self.ranks)} does not match num_clients={self.num_clients}"
                )


def make_partition(
    config: PartitionConfig,
    num_examples: int,
    labels: Sequence[Any] | None = None,
) -> list[np.ndarray]:
    """Dispatches to the partitioner named by ``config.kind``.

    Args:
        config: The partition settings.
        num_examples: ``N``.
        labels: ``[N]`` labels (required for ``dirichlet``, ``meta``, ``rank_correlated``).

    Returns:
        ``config.num_clients`` sorted int64 index arrays.

    Raises:
        DataError: Missing or mis-sized labels, or any partitioner error.
    """
    if config.kind in ("dirichlet", "meta", "rank_correlated"):
        if labels is None:
            raise DataError(f"partition kind {config.kind!r} needs labels")
        if len(labels) != num_examples:
            raise DataError(f"got {len(labels)} labels for {num_examples} examples")
    if config.kind == "iid":
        return iid_partition(num_examples, config.num_clients, config.seed)
    if config.kind == "quantity_skew":
        return quantity_skew_partition(
            num_examples, config.num_clients, config.seed,
            method=config.quantity_method, alpha=config.alpha, exponent=config.exponent,
        )
    if config.kind == "dirichlet":
        return dirichlet_partition(
            labels, config.num_clients, config.alpha, config.seed  # type: ignore[arg-type]
        )
    if config.kind == "meta":
        return meta_partition(labels, config.num_clients, config.seed)  # type: ignore[arg-type]
    return rank_correlated_partition(
        labels,  # type: ignore[arg-type]
        config.ranks,  # type: ignore[arg-type]
        config.seed,
        num_private_clients=config.num_private_clients,
        num_private_labels=config.num_private_labels,
        private_labels=config.private_labels,
        share_with_private=config.share_with_private,
    )


def label_skew(partitions: Sequence[np.ndarray], labels: Sequence[Any]) -> float:
    """Mean total-variation distance between client and global label mixes.

    0 means every client has the global label distribution; values near
    ``1 - max_c p(c)`` mean each client holds a single label.

    Args:
        partitions: One index array per client.
        labels: ``[N]`` labels.

    Returns:
        The size-unweighted mean over clients of ``0.5 * ||p_k - p||_1``.
    """
    lab = _as_labels(labels)
    classes = sorted(set(lab))
    pos = {c: i for i, c in enumerate(classes)}
    codes = np.asarray([pos[x] for x in lab])
    glob = np.bincount(codes, minlength=len(classes)) / len(codes)
    tvs = []
    for part in partitions:
        cnt = np.bincount(codes[np.asarray(part)], minlength=len(classes))
        tvs.append(0.5 * np.abs(cnt / max(cnt.sum(), 1) - glob).sum())
    return float(np.mean(tvs))


@dataclasses.dataclass(frozen=True)
class PartitionSummary:
    """Examples and label mix per client.

    Attributes:
        classes: Label names (columns), most frequent overall first.
        counts: ``[C, L]`` int64 examples of each label per client.
        ranks: Optional ``[C]`` client ranks.
    """

    classes: tuple[str, ...]
    counts: np.ndarray
    ranks: tuple[int, ...] | None = None

    @property
    def sizes(self) -> np.ndarray:
        """``[C]`` examples per client."""
        return self.counts.sum(axis=1)

    def format(self, max_label_width: int = 14) -> str:
        """Renders a plain-text table (one row per client plus a total row).

        Args:
            max_label_width: Column headers are cut to this many characters.

        Returns:
            The table.
        """
        heads = ["client"] + (["rank"] if self.ranks is not None else []) + ["n"]
        heads += [c[:max_label_width] for c in self.classes] + ["top%"]
        rows = []
        for k, row in enumerate(self.counts):
            cells = [str(k)] + ([str(self.ranks[k])] if self.ranks is not None else [])
            top = 100.0 * row.max() / max(row.sum(), 1)
            cells += [str(int(row.sum()))] + [str(int(v)) for v in row] + [f"{top:.0f}"]
            rows.append(cells)
        tot = self.counts.sum(axis=0)
        rows.append(
            ["total"] + ([""] if self.ranks is not None else [])
            + [str(int(tot.sum()))] + [str(int(v)) for v in tot]
            + [f"{100.0 * tot.max() / max(tot.sum(), 1):.0f}"]
        )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(heads), sep, *(line(r) for r in rows[:-1]), sep, line(rows[-1])])

    def __str__(self) -> str:
        return self.format()


def partition_summary(
    partitions: Sequence[np.ndarray],
    labels: Sequence[Any] | None = None,
    ranks: Sequence[int] | None = None,
) -> PartitionSummary:
    """Counts examples and labels per client.

    Args:
        partitions: One index array per client.
        labels: ``[N]`` labels; ``None`` counts sizes only (one column "all").
        ranks: Optional ``[C]`` ranks shown in the table.

    Returns:
        A :class:`PartitionSummary`.
    """
    if labels is None:
        counts = np.asarray([[len(p)] for p in partitions], dtype=np.int64)
        return PartitionSummary(("all",), counts, tuple(ranks) if ranks is not None else None)
    lab = _as_labels(labels)
    classes = _sorted_classes(lab)
    pos = {c: i for i, c in enumerate(classes)}
    codes = np.asarray([pos[x] for x in lab])
    counts = np.stack(
        [np.bincount(codes[np.asarray(p, dtype=np.int64)], minlength=len(classes)) for p in partitions]
    ).astype(np.int64)
    rank_tuple = tuple(int(r) for r in ranks) if ranks is not None else None
    return PartitionSummary(tuple(classes), counts, rank_tuple)


def format_partition_summary(
    partitions: Sequence[np.ndarray],
    labels: Sequence[Any] | None = None,
    ranks: Sequence[int] | None = None,
) -> str:
    """Shorthand for ``partition_summary(...).format()``."""
    return partition_summary(partitions, labels, ranks).format()


def plot_partition_summary(
    partitions: Sequence[np.ndarray],
    labels: Sequence[Any] | None,
    path: str | Path,
    *,
    ranks: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Saves a stacked bar chart (examples per label per client) as PNG.

    Uses matplotlib's object API with the Agg canvas, so it never touches the
    global pyplot state or needs a display.

    Args:
        partitions: One index array per client.
        labels: ``[N]`` labels, or ``None`` for plain sizes.
        path: Output file (parent directories are created).
        ranks: Optional ranks, shown in the x tick labels.
        title: Optional title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = partition_summary(partitions, labels, ranks)
    c = summary.counts.shape[0]
    fig = Figure(figsize=(max(6.0, 0.45 * c + 3.0), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(c)
    x = np.arange(c)
    for j, name in enumerate(summary.classes):
        ax.bar(x, summary.counts[:, j], bottom=bottom, label=name)
        bottom += summary.counts[:, j]
    ticks = [f"{k}" if ranks is None else f"{k}\nr={ranks[k]}" for k in range(c)]
    ax.set_xticks(x, ticks, fontsize=7 if c > 20 else 9)
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    if title:
        ax.set_title(title)
    if len(summary.classes) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
