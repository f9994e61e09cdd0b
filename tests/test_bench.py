"""The benchmark harness in its ``--quick --dry`` form: every provider called once on tiny sizes, every
output written, agreement computed from the answers (so a fast wrong answer shows up as such)."""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np
import pytest

from ncutfast import reference
from ncutfast.bench import cli, harness, report
from ncutfast.bench.providers import Solution, TorchEigh, build_providers


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--quick", "--dry", "--device", "cpu", "--out", str(out)]) == 0
    return out


def _rows(out) -> list[dict[str, str]]:
    with open(out / "cpu_results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_dry_run_calls_every_provider_once_per_workload(dry_run) -> None:
    providers, _ = build_providers("cpu")
    suite = harness.suite_for("cpu", quick=True, dry=True)
    rows = _rows(dry_run)
    for p in providers:
        mine = [r for r in rows if r["provider"] == p.name]
        assert sorted(int(r["n"]) for r in mine) == sorted(suite.ns), p.name
        for r in mine:
            assert r["status"] == "dry", (p.name, r["status"])
            assert int(r["repeats"]) == 0
            assert float(r["time_ms"]) > 0 and float(r["peak_mib"]) >= 0


def test_dry_run_computes_agreement(dry_run) -> None:
    rows = _rows(dry_run)
    assert all(int(r["agree_n"]) >= 1 for r in rows)  # planted scenes have a clear eigengap
    for r in rows:
        assert 0.0 <= float(r["partitions"]) <= 1.0 and 0.0 <= float(r["align_min"]) <= 1.0 + 1e-9
    # ncutfast and the dense exact solvers reproduce the reference; the reference agrees with itself.
    for r in rows:
        if r["family"] in ("reference", "ncutfast") or r["provider"] == "torch.linalg.eigh":
            assert r["agrees"] == "yes", r


def test_dry_run_reports_the_exact_recheck_fraction(dry_run) -> None:
    """Precision "exact" rows carry their recheck fraction (CSV and markdown); the others have none."""
    rows = _rows(dry_run)
    exact = [r for r in rows if r["provider"].endswith("-exact")]
    assert {r["provider"] for r in exact} >= {"ncutfast-torch-exact"}
    for r in rows:
        assert (0.0 <= float(r["recheck"]) <= 1.0) if r in exact else np.isnan(float(r["recheck"]))
    assert "| agrees | recheck | status |" in (dry_run / "cpu_results.md").read_text()


def test_dry_run_writes_tables_and_plots(dry_run) -> None:
    md = (dry_run / "cpu_results.md").read_text()
    assert "| provider | N | C | B | ms/img |" in md
    assert "cupy-eigh: skipped, GPU only" in md
    assert "cpu:" in md and "date:" in md
    pytest.importorskip("matplotlib")
    for name in ("cpu_time_vs_n.png", "cpu_speedup.png"):
        assert (dry_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_answers_are_visible(rng: np.random.Generator) -> None:
    feats = harness.make_batch(100, 16, 2, seed=3, device="cpu")
    ref_p = build_providers("cpu")[0][0]
    suite = harness.suite_for("cpu", quick=True, dry=True)
    _, ref = harness._run_reference(ref_p, feats, 0.2, 1e-5, suite)
    exact = ref_p.finish(ref_p.solve(feats, 0.2, 1e-5), feats, 0.2, 1e-5)
    good = harness.measure_agreement(exact, ref)
    assert good["agrees"] == "yes" and good["partitions"] == 1.0
    flipped = Solution(-3.0 * exact.x, exact.lambda2, exact.lambda3)  # sign and scale do not matter
    assert harness.measure_agreement(flipped, ref)["agrees"] == "yes"
    noise = Solution(rng.standard_normal(exact.x.shape), exact.lambda2 * 2, exact.lambda3)
    bad = harness.measure_agreement(noise, ref)
    assert bad["agrees"] == "NO" and bad["align_min"] < 0.5 and bad["lambda2_err"] > 0


def test_fit_exponent_and_scaling_table() -> None:
    ns = [784, 1200, 3600]
    assert harness.fit_exponent(ns, [3.0 * n**2.5 for n in ns]) == pytest.approx(2.5)
    rows = [harness.Row("cpu", "p", "peer", True, n, 8, 1, time_ms=1e-6 * n**3) for n in [196, *ns]]
    (entry,) = report.scaling_table(rows, fit_min_n=784)
    assert entry["points"] == 3 and entry["exponent"] == pytest.approx(3.0)


def test_register_adds_the_bench_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="ncutfast")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--dry", "--n", "64"])
    assert args.func is cli.run_from_args and args.n == [64] and args.quick and args.dry


def test_budget_and_memory_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    class Slow(TorchEigh):
        def solve(self, feats, tau, eps):
            time.sleep(0.05)
            return super().solve(feats, tau, eps)

    class Huge(TorchEigh):
        def footprint(self, n: int, c: int, b: int) -> int:
            return 1 << 60

    real, slow, huge = build_providers("cpu")[0][0], Slow("cpu"), Huge("cpu")
    slow.name, huge.name = "slow", "huge"
    monkeypatch.setattr(harness, "build_providers", lambda device: ([real, slow, huge], []))
    suite = harness.Suite(ns=(16, 25), cs=(8,), batches=(1,), repeats=3, budget_s=0.01, ref_images=1)
    result = harness.run("cpu", suite, log=lambda line: None)
    rows = [r for r in result.rows if r.provider == "slow"]
    assert rows[0].status == "ok" and rows[0].repeats == 1 and rows[0].agrees == "yes"
    assert rows[1].status.startswith("skipped: over the 0.01 s budget at N=16")
    assert all(r.status.startswith("skipped: needs") for r in result.rows if r.provider == "huge")


def test_seed_tied_across_signs_accepts_either_side() -> None:
    def ref_for(x_ref: np.ndarray) -> harness._Reference:
        part, x, seed = reference.orient_tokencut(x_ref)
        return harness._Reference([reference.NcutResult(0.1, 0.5, x, part, seed)], [np.ones(x.size)], 1.0)

    lam = np.array([0.1])
    tied = np.array([1.0, 1.0, -1.0, -1.0, 0.5, -0.5])  # max|x| reached with both signs
    other = np.array([[1.0 - 1e-9, 1.0, -1.0 - 2e-9, -1.0, 0.5, -0.5]])  # rounding picks the other side
    got = harness.measure_agreement(Solution(other, lam, lam * 5), ref_for(tied))
    assert got["partitions"] == 1.0 and got["tokens"] == 1.0
    untied = np.array([2.0, 1.0, -1.0, -1.0, 0.5, -1.5])  # one seed: the complement is a wrong answer
    complement = ~reference.orient_tokencut(untied)[0]
    sol = Solution(untied[None], lam, lam * 5, complement[None], np.array([0]))
    assert harness.measure_agreement(sol, ref_for(untied))["partitions"] == 0.0
