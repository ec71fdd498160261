"""Partitions, labels and partition summaries (fedhl_jax.data.partition / labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhl_jax.data import (
    DataSource,
    DataError,
    PartitionConfig,
    code_language,
    dataset_labels,
    dirichlet_partition,
    dolly_derived_label,
    format_partition_summary,
    gsm8k_answer_size,
    gsm8k_num_steps,
    gsm8k_steps_label,
    iid_partition,
    label_skew,
    load_instruction_dataset,
    make_partition,
    meta_partition,
    partition_summary,
    plot_partition_summary,
    quantity_skew_partition,
    rank_correlated_partition,
    validate_partition,
)

FIX = Path(__file__).parent / "fixtures" / "data"


def _labels(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``n`` labels over ``k`` classes with unequal frequencies."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, k + 1, dtype=float)
    return np.asarray([f"L{j}" for j in rng.choice(k, size=n, p=p / p.sum())], dtype=object)


def _client_labels(parts, labels):
    return [set(labels[p]) for p in parts]


# ------------------------------------------------------------------ IID


def test_iid_cover_balance_determinism():
    parts = iid_partition(103, 10, seed=3)
    validate_partition(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = iid_partition(103, 10, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = iid_partition(103, 10, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
    assert all(p.dtype == np.int64 and (np.diff(p) > 0).all() for p in parts)


# ------------------------------------------------------------ Dirichlet


def test_dirichlet_cover_and_determinism():
    labels = _labels(500, 6)
    parts = dirichlet_partition(labels, 12, alpha=0.3, seed=1)
    validate_partition(parts, 500)
    again = dirichlet_partition(labels, 12, alpha=0.3, seed=1)
    assert all((a == b).all() for a, b in zip(parts, again))


def test_dirichlet_small_alpha_more_skewed():
    labels = _labels(2000, 8)
    skew = {
        a: np.mean([label_skew(dirichlet_partition(labels, 10, a, seed=s), labels) for s in range(3)])
        for a in (0.05, 1.0, 100.0)
    }
    assert skew[0.05] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1


def test_dirichlet_tiny_alpha_still_nonempty():
    labels = _labels(60, 3)
    parts = dirichlet_partition(labels, 40, alpha=1e-3, seed=0)
    validate_partition(parts, 60)


# ------------------------------------------------------------------ meta


def test_meta_one_label_per_client():
    labels = _labels(300, 5)
    parts = meta_partition(labels, 5, seed=0)
    validate_partition(parts, 300)
    per_client = _client_labels(parts, labels)
    assert all(len(s) == 1 for s in per_client)
    assert set().union(*per_client) == set(labels)


def test_meta_more_clients_than_labels():
    labels = _labels(300, 4)
    parts = meta_partition(labels, 11, seed=0)
    validate_partition(parts, 300)
    assert all(len(s) == 1 for s in _client_labels(parts, labels))
    # The most frequent label gets the most clients.
    owners = [next(iter(s)) for s in _client_labels(parts, labels)]
    assert owners.count("L3") >= owners.count("L0")


def test_meta_fewer_clients_than_labels_disjoint_groups():
    labels = _labels(300, 7)
    parts = meta_partition(labels, 3, seed=0)
    validate_partition(parts, 300)
    groups = _client_labels(parts, labels)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not groups[i] & groups[j]


# -------------------------------------------------------------- quantity


def test_quantity_skew_dirichlet_and_power_law():
    for kw in ({"method": "dirichlet", "alpha": 0.3}, {"method": "power_law", "exponent": 1.5}):
        parts = quantity_skew_partition(1000, 10, seed=0, **kw)
        validate_partition(parts, 1000)
        sizes = np.array([len(p) for p in parts])
        assert sizes.min() >= 1 and sizes.max() > 3 * sizes.min()
    flat = quantity_skew_partition(1000, 10, seed=0, method="power_law", exponent=0.0)
    assert {len(p) for p in flat} == {100}


def test_quantity_small_alpha_more_skewed():
    def spread(alpha):
        return np.mean([np.std([len(p) for p in quantity_skew_partition(2000, 10, s, alpha=alpha)])
                        for s in range(5)])
    assert spread(0.1) > spread(10.0)


# ------------------------------------------------------------------ rank


def test_rank_correlated_uniqueness():
    labels = _labels(600, 6)
    ranks = [8, 2, 16, 2, 8, 4, 16, 32]
    parts = rank_correlated_partition(labels, ranks, seed=0)
    validate_partition(parts, 600)
    low = {1, 3}  # the clients with the minimum rank 2
    counts = {c: int((labels == c).sum()) for c in set(labels)}
    private = sorted(counts, key=lambda c: (counts[c], c))[:2]  # two least frequent labels
    per_client = _client_labels(parts, labels)
    for k, labs in enumerate(per_client):
        if k in low:
            assert labs <= set(private) and labs  # only private labels
        else:
            assert not labs & set(private)  # nobody else has them
    # Each private label lives on exactly one low-rank client.
    for c in private:
        assert sum(c in per_client[k] for k in low) == 1


def test_rank_correlated_explicit_labels_and_sharing():
    labels = _labels(600, 6)
    ranks = [4, 4, 4, 8, 8, 16]
    parts = rank_correlated_partition(
        labels, ranks, seed=1, private_labels=["L5"], share_with_private=True
    )
    validate_partition(parts, 600)
    per_client = _client_labels(parts, labels)
    assert {k for k, s in enumerate(per_client) if "L5" in s} <= {0, 1, 2}
    assert all(len(s) > 1 for s in per_client[:3])  # private clients also got shared labels


def test_rank_correlated_num_private_clients_with_equal_ranks():
    labels = _labels(200, 4)
    parts = rank_correlated_partition(labels, [4] * 5, seed=0, num_private_clients=2)
    validate_partition(parts, 200)
    per_client = _client_labels(parts, labels)
    assert not (per_client[0] | per_client[1]) & set().union(*per_client[2:])


def test_rank_correlated_errors():
    labels = _labels(200, 4)
    with pytest.raises(DataError, match=r"unknown label 'L9' in private_labels"):
        rank_correlated_partition(labels, [2, 4, 8], private_labels=["L9"])
    with pytest.raises(DataError, match="all 3 clients have rank 4"):
        rank_correlated_partition(labels, [4, 4, 4])
    with pytest.raises(DataError, match="needs >= 2 labels"):
        rank_correlated_partition(["a"] * 10, [2, 4])
    with pytest.raises(DataError, match="at least one shared label"):
        rank_correlated_partition(labels, [2, 4], private_labels=["L0", "L1", "L2", "L3"])


# ---------------------------------------------------------- common errors


@pytest.mark.parametrize(
    "fn",
    [
        lambda: iid_partition(5, 6),
        lambda: dirichlet_partition(["a"] * 5, 6, 0.5),
        lambda: meta_partition(["a", "b", "a", "b", "a"], 6),
        lambda: quantity_skew_partition(5, 6),
        lambda: rank_correlated_partition(["a", "b", "a", "b", "a"], [1, 2, 3, 4, 5, 6]),
    ],
)
def test_more_clients_than_examples(fn):
    with pytest.raises(DataError, match="more clients than examples: 6 clients but only 5 examples"):
        fn()


def test_unknown_label_against_classes():
    with pytest.raises(DataError, match=r"unknown label 'c\+\+' at example 2"):
        dirichlet_partition(["python", "java", "c++"], 2, 0.5, classes=["python", "java"])
    with pytest.raises(DataError, match=r"unknown label 'x' at example 0"):
        meta_partition(["x", "java"], 2, classes=["python", "java"])


def test_bad_parameters():
    with pytest.raises(DataError, match="alpha must be > 0"):
        dirichlet_partition(["a", "b"], 2, alpha=0.0)
    with pytest.raises(DataError, match="unknown quantity-skew method 'zipf'"):
        quantity_skew_partition(10, 2, method="zipf")
    with pytest.raises(DataError, match="unknown partition kind 'random'"):
        PartitionConfig(kind="random")
    with pytest.raises(DataError, match="needs ranks"):
        PartitionConfig(kind="rank_correlated", num_clients=3)
    with pytest.raises(DataError, match="does not match num_clients"):
        PartitionConfig(kind="rank_correlated", num_clients=3, ranks=(2, 4))
    with pytest.raises(DataError, match="needs labels"):
        make_partition(PartitionConfig(kind="meta", num_clients=2), 10)


def test_validate_partition_detects_problems():
    with pytest.raises(DataError, match="client 1 has no examples"):
        validate_partition([np.array([0, 1]), np.array([], dtype=np.int64)], 2)
    with pytest.raises(DataError, match="example 1 is assigned to more than one client"):
        validate_partition([np.array([0, 1]), np.array([1])], 2)
    with pytest.raises(DataError, match="1 examples are assigned to no client"):
        validate_partition([np.array([0]), np.array([1])], 3)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    c=st.integers(1, 12),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["iid", "dirichlet", "meta", "quantity_skew"]),
)
def test_partitions_always_cover(n, c, k, seed, kind):
    labels = [f"L{i % k}" for i in range(n)]
    cfg = PartitionConfig(kind=kind, num_clients=c, seed=seed, alpha=0.2)
    if c > n:
        with pytest.raises(DataError, match="more clients than examples"):
            make_partition(cfg, n, labels)
        return
    parts = make_partition(cfg, n, labels)
    assert len(parts) == c
    validate_partition(parts, n)


# --------------------------------------------------------------- summary


def test_summary_table_and_plot(tmp_path):
    labels = _labels(120, 3)
    parts = rank_correlated_partition(labels, [2, 8, 8, 16], seed=0)
    s = partition_summary(parts, labels, ranks=[2, 8, 8, 16])
    assert s.counts.shape == (4, 3) and s.counts.sum() == 120
    assert s.sizes.tolist() == [len(p) for p in parts]
    text = format_partition_summary(parts, labels, ranks=[2, 8, 8, 16])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["client", "rank", "n"]
    assert lines[-1].split()[:2] == ["total", "120"]
    assert len(lines) == 4 + 4  # header, 2 rules, 4 clients, total
    sizes_only = partition_summary(iid_partition(10, 2), None)
    assert sizes_only.classes == ("all",) and sizes_only.counts.ravel().tolist() == [5, 5]
    out = plot_partition_summary(parts, labels, tmp_path / "sub" / "p.png", ranks=[2, 8, 8, 16], title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "instruction, inp, output, expected",
    [
        ("Write a Python function to add.", "", "", "python"),
        ("Write a function in JavaScript.", "", "", "javascript"),
        ("Implement it in Node.js", "", "", "javascript"),
        ("Write a Java method.", "", "", "java"),
        ("Write a C++ program.", "", "", "c++"),
        ("Create a C# class.", "", "", "c#"),
        ("Write a C program that sums an array.", "", "", "c"),
        ("Write a SQL query.", "", "", "sql"),
        ("Create an HTML page.", "", "", "html-css"),
        ("Write a CSS rule.", "", "", "html-css"),
        ("Write a bash script.", "", "", "shell"),
        ("Write a PHP function.", "", "<?php echo $x; ?>", "other"),
        ("Translate the given C++ code into Java.", "", "", "java"),
        ("In Python, download a page's HTML.", "", "import requests\nprint(requests.get(u).text)", "python"),
        ("Sort the list.", "", "def f(x):\n    return sorted(x)", "python"),
        ("Sort the list.", "", "const f = (x) => x.sort();\nconsole.log(f([2, 1]));", "javascript"),
        ("Print hi.", "", 'public class A { public static void main(String[] a) {\n'
         '  System.out.println("hi"); } }', "java"),
        ("Print hi.", "", "#include <iostream>\nint main() { std::cout << 1; }", "c++"),
        ("Print hi.", "", '#include <stdio.h>\nint main() { printf("hi"); }', "c"),
        ("Get rows.", "", "SELECT name FROM users WHERE id = 1;", "sql"),
        ("Style it.", "", "p {\n  color: red;\n}", "html-css"),
        ("List files.", "", "#!/bin/bash\nls -la", "shell"),
        ("Fix this code.", "for i in range(3):\n    print(i]", "Use a closing parenthesis.", "python"),
        ("What is recursion?", "", "A function calling itself.", "other"),
        ("Store the variables a, b, c.", "", "", "other"),
    ],
)
def test_code_language(instruction, inp, output, expected):
    assert code_language(instruction, inp, output) == expected


def test_codealpaca_fixture_languages():
    ds = load_instruction_dataset(DataSource("codealpaca", path=str(FIX / "codealpaca_small.jsonl")))
    assert dataset_labels("codealpaca", ds).tolist() == [
        "python", "javascript", "java", "c++", "sql", "html-css", "shell", "python", "other", "java",
    ]


def test_gsm8k_labels():
    ans = "a = <<1+1=2>>2\nb = 3\n\nc = 4\n#### 1,234"
    assert gsm8k_num_steps(ans) == 3
    assert gsm8k_steps_label(ans) == "steps=3"
    assert gsm8k_steps_label("x\n#### 1") == "steps<=2"
    assert gsm8k_steps_label("\n".join("s" for _ in range(9)) + "\n#### 1") == "steps>=6"
    assert gsm8k_answer_size(ans) == "digits>=4"
    assert gsm8k_answer_size("#### 72") == "digits=2"
    assert gsm8k_answer_size("#### -5") == "digits=1"
    ds = load_instruction_dataset(DataSource("gsm8k", path=str(FIX / "gsm8k_small.jsonl")))
    assert dataset_labels("gsm8k", ds).tolist() == [
        "steps<=2", "steps<=2", "steps=3", "steps=4", "steps=5", "steps>=6", "steps<=2", "steps=3",
    ]
    assert dataset_labels("gsm8k", ds, "answer_size")[3] == "digits>=4"


def test_dolly_labels_category_and_fallback(caplog):
    with_cat = load_instruction_dataset(DataSource("dolly", path=str(FIX / "dolly_small.jsonl")))
    assert dataset_labels("dolly", with_cat).tolist()[:3] == ["open_qa", "summarization", "brainstorming"]
    no_cat = load_instruction_dataset(DataSource("dolly", path=str(FIX / "dolly_nocat.jsonl")))
    with caplog.at_level("WARNING"):
        derived = dataset_labels("dolly", no_cat).tolist()
    assert "no 'category' field" in caplog.text
    assert derived == ["what", "with_context", "other", "other", "who/when/where/which",
                       "with_context", "other", "how/why"]
    assert dataset_labels("dolly", no_cat, "context").tolist().count("with_context") == 2
    assert dolly_derived_label("  Why? is the sky blue") == "how/why"
    assert dolly_derived_label("") == "other"


def test_unknown_label_kind():
    with pytest.raises(DataError, match="unknown label kind 'topic' for dataset 'gsm8k'"):
        dataset_labels("gsm8k", [], "topic")
    with pytest.raises(DataError, match=r"unknown dataset name 'mmlu'; expected one of \["):
        dataset_labels("mmlu", [])
