"""The analysis tool: its pure parts, the balance report, and A-1..A-4 against real stacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from analysis import balance, experiments, weighted
from analysis.client import AnalysisError, Result, parse_server_id
from analysis.explain import explain_preset
from analysis.report import markdown_table, summarize, text_table
from analysis.stacks import CommandKiller, RegistryKiller
from tests.conftest import RunningStack


# -- pure ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "sid"), [
    ('{"message": "Hello from Server: 12", "status": "successful"}', 12),
    ('{"message":"Hello from Server: 3"}', 3),
    ('{"message": "<Error> nope", "status": "failure"}', None),
])
def test_server_id_is_read_from_the_contracts_reply(body: str, sid: int | None) -> None:
    assert parse_server_id(body) == sid


def test_summary_counts_per_replica_and_errors() -> None:
    results = ([Result(0.0, 0.01, 200, 1, "Server1")] * 6 + [Result(0.0, 0.02, 200, 2, "S2")] * 2
               + [Result(0.5, 1.0, 0, error="ClientConnectorError")])
    s = summarize(results, n=3)
    assert s["per_server"] == {"1": 6, "2": 2}
    assert (s["ok"], s["errors"], s["min"], s["max"]) == (8, 1, 0, 6)
    assert s["max_over_mean"] == pytest.approx(6 / (8 / 3), abs=1e-3)
    assert s["hostnames"] == {"1": ["Server1"], "2": ["S2"]}


def test_tables() -> None:
    assert markdown_table(["a", "b"], [(1, 2)]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert text_table(["name", "n"], [("x", 10)]).splitlines()[2] == "x     10"


def test_command_killer_fills_in_the_template_and_reports_failure() -> None:
    assert CommandKiller("true {hostname} {server_id}").kill("S1", 1) == "true S1 1"
    with pytest.raises(AnalysisError, match="failed"):
        CommandKiller("false {hostname}").kill("S1", 1)


def test_registry_killer_needs_a_known_replica(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"replicas": [{"hostname": "S1", "handle": None}]}))
    with pytest.raises(AnalysisError, match="no local process"):
        RegistryKiller(str(path)).kill("S1", 1)
    with pytest.raises(AnalysisError, match="no replica"):
        RegistryKiller(str(path)).kill("S9", 9)


def test_the_contracts_imbalance_facts_hold() -> None:
    """contract.md: seed ~97% to one replica; handout's H reaches 87 of 512 slots, ~84%."""
    seed, handout = explain_preset("seed"), explain_preset("cs60002")
    assert 0.95 < seed["request_share"]["1"] < 0.98
    assert seed["arcs"]["2"] == [1] * 9  # ids 2 and 3 own only the slot their server sits on
    assert handout["slots_reached_by_H"] == 87
    assert 0.80 < handout["request_share"]["1"] < 0.88


def test_balance_report_writes_tables_and_ranks_maglev_best(tmp_path: Path) -> None:
    results = balance.run(str(tmp_path), count=1000, n_min=2, n_max=4,
                          only=["ring seed", "maglev"], repeats=2, echo=False)
    for name in ("balance.md", "balance.json", "balance.png"):
        assert (tmp_path / name).stat().st_size > 0
    maglev, seed = balance.verdict(results["maglev"]), balance.verdict(results["ring seed"])
    assert maglev["share_ok"] and maglev["exact_movement_ok"]
    assert seed["max_mean"] > 1.9 and not seed["balance_ok"]
    assert "| maglev |" in (tmp_path / "balance.md").read_text()


# docs/analysis.md's "Balance beyond the spec" table: its rows for the presets, as lb-analyze balance
# --hash must reproduce them.
ANALYSIS_DOC = Path(__file__).resolve().parent.parent / "docs" / "analysis.md"
ANALYSIS_ROWS = {"ring seed (spec)": "seed", "ring cs60002": "cs60002",
               "ring xxhash, M = 512, K = 9": "xxhash"}


@pytest.mark.parametrize(("label", "preset"), ANALYSIS_ROWS.items())
def test_balance_hash_figures_for_the_presets_match_the_readme(label: str, preset: str) -> None:
    row = next(line for line in ANALYSIS_DOC.read_text().splitlines()
               if line.startswith(f"| {label} |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert balance.hash_report(preset).summary_cells() == cells[1:6]


def test_balance_hash_judges_a_formula_from_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.__main__ import main

    main(["balance", "--hash", "H=3*i**2+7*i+11; Phi=i**2+j**2+2*j+25", "--chart",
          "--requests", "1000", "--repeats", "2", "--n-max", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # 3i^2 + 7i = i(3i + 7) is always even, so H is always odd: half the slots, never the rest.
    assert "H reaches 256 of 512 slots over all 900,000 6-digit request ids" in out
    assert "| server id | slots of its virtual servers |" in out
    assert "| 1 | 26, 29, 34, 41, 50, 61, 74, 89, 106 |" in out  # Phi(1, j) = j^2 + 2j + 26
    assert out.count("\n| 2 |") == 2 and "| 4 |" in out  # placement and N = 2..4 rows
    assert "moved on add (/ideal)" in out and "expected shares" in out
    assert [p.name for p in tmp_path.glob("*.png")] == ["balance-hash-ff57ff04.png"]
    with pytest.raises(SystemExit, match=r"lb-analyze: --hash: LB_HASH, character 10 \(in Phi\): "
                                         "unknown name 'k'"):
        main(["balance", "--hash", "H=i; Phi=k", "--out", str(tmp_path)])


def test_balance_weights_gives_each_replica_its_part(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.__main__ import main

    main(["balance", "--weights", "1,2,3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "balance-weights.json").read_text())
    strategies = data["strategies"]
    targets = {"1": 1 / 6, "2": 2 / 6, "3": 3 / 6}
    for name, within in (("maglev", 0.01), ("ring160", 0.05)):
        share = strategies[name]["share"]
        assert set(share) == set(targets)
        for sid, target in targets.items():
            assert abs(share[sid] / target - 1) < within, (name, sid, share)
        assert strategies[name]["worst_error"] < within
    # Bounded loads cap each replica at c x its part of the requests so far.
    bounded = strategies["maglev + bounded 1.05"]["share"]
    assert all(bounded[sid] <= 1.05 * t + 1 / data["requests"] for sid, t in targets.items())
    assert "| 3 | 3 | 50.00 % | 50.01 % | +0.02 % |" in out  # maglev's row for id 3
    assert "| target w / W | - | 16.67 / 33.33 / 50.00 |" in out
    assert (tmp_path / "balance-weights.png").stat().st_size > 0
    assert not (tmp_path / "balance.md").exists()  # the sweep's report is left as it was


def test_balance_weights_says_where_there_is_no_room(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = {r.name: r for r in weighted.run(
        [256, 256], str(tmp_path), count=500, only=["ring seed", "ring160", "maglev"],
        plot=False, echo=False)}
    assert results["ring seed"].share is None
    assert results["ring seed"].no_room == ("w x K virtual servers for weights adding up to 512 "
                                            "do not fit: all 512 slots are taken")
    assert results["ring160"].no_room == ("ring160 has room for weights adding up to 409 "
                                          "(160 virtual servers each in 65536 slots), not 512")
    assert results["maglev"].no_room is None and results["maglev"].worst_error < 0.01
    text = (tmp_path / "balance-weights.md").read_text()
    assert "| ring160 | no room: ring160 has room for weights adding up to 409" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--weights", "1,2,x"], ("one integer per replica, separated by commas, like 1,2,3; "
                              "not '1,2,x'")),
    (["--weights", "1,,2"], "one integer per replica"),
    (["--weights", ""], "one integer per replica"),
    (["--weights", "1,0"], "a weight is an integer from 1 to 256, not 0"),
    (["--weights", "257"], "a weight is an integer from 1 to 256, not 257"),
    (["--weights", "1,2,3", "--n-max", "5"], "3 replicas, but --n-max says 5"),
    (["--weights", "1,2", "--hash", "seed"], "goes without --hash"),
])
def test_balance_weights_rejects_bad_values_on_one_line(
        argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["balance", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lb-analyze: --weights: ") and message in err
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_weights_of_one_build_the_unweighted_maps() -> None:
    """Every strategy built with all weights 1 is the map the sweep measures without weights."""
    ids = [1, 2, 3, 4]
    for variant in balance.variants():
        plain, ones = variant.build(ids), variant.build(ids, dict.fromkeys(ids, 1))
        assert list(plain.owners()) == list(ones.owners()), variant.name


def test_balance_without_weights_prints_the_sweep(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.__main__ import main

    main(["balance", "--only", "maglev", "--requests", "500", "--repeats", "1", "--n-max", "3",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("# Balance of the lookup strategies\n")
    assert "server ids 1..N, N = 2..3." in out and "| maglev |" in out
    assert not list(tmp_path.glob("balance-weights*"))


# -- against real stacks ---------------------------------------------------------------------
@pytest.mark.system
def test_a1_a2_a3_against_a_running_stack(make_stack: Callable[..., RunningStack],
                                          tmp_path: Path) -> None:
    stack = make_stack()
    ctx = experiments.Context(stack.url, str(tmp_path), requests=300, concurrency=8,
                              progress=False, registry=stack.settings.registry_path,
                              log=lambda _: None)
    s1 = experiments.a1(ctx)
    assert s1["ok"] == 300 and s1["replicas"] == 3
    assert max(s1["per_server"].values()) > 0.9 * 300  # the seed's lopsided map, as documented

    rows = experiments.a2(ctx, range(2, 4))
    assert [r["replicas"] for r in rows] == [2, 3] and all(r["ok"] == 300 for r in rows)
    assert stack.rep()["N"] == 3  # put back as it was

    data = experiments.a3(ctx, duration=8.0, kill_at=1.5)
    assert all(c["ok"] for c in data["endpoints"]), data["endpoints"]
    timeline = data["timeline"]
    assert timeline["victim_id"] == 1
    assert timeline["recovery_s"] is not None  # the replacement served within the run
    for name in ("a1.png", "a1.json", "a1.csv", "a2.png", "a2.csv", "a3.png", "a3.json"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.system
def test_a4_side_by_side_over_given_targets(make_stack: Callable[..., RunningStack],
                                            tmp_path: Path) -> None:
    stack = make_stack(strategy="maglev")
    ctx = experiments.Context(stack.url, str(tmp_path), requests=300, concurrency=8,
                              progress=False, log=lambda _: None)
    out = experiments.a4(ctx, ["maglev"], spawn=False, targets={"maglev": stack.url},
                         n_values=range(3, 4))
    assert max(out["maglev"]["a1"]["per_server"].values()) < 0.5 * 300
    assert (tmp_path / "a4.png").stat().st_size > 0
    assert (tmp_path / "a4" / "maglev" / "a1.json").exists()
