"""The benchmark suite: which runs it plans, and a smoke run end to end on the debug config."""

from __future__ import annotations

import pytest

from split_model.bench import bench_main, suite


def test_the_plan_pairs_tasks_with_variants_and_skips_cot_where_nothing_is_written():
    runs = suite.plan(["prosqa", "gym_gcd"], ["all", "none", "cot"])
    assert [(t, v) for t, v, _ in runs] == [("prosqa", "all"), ("prosqa", "none"), ("prosqa", "cot"),
                                            ("gym_gcd", "all"), ("gym_gcd", "none")]
    argv = dict(((t, v), a) for t, v, a in runs)
    assert argv[("prosqa", "cot")][:3] == ["fit", "--config", str(suite.ROOT / "configs" / "prosqa.yaml")]
    assert "--data.steps=text" in argv[("prosqa", "cot")] and "--model.reasoner.feedback=none" in argv[("gym_gcd", "none")]
    assert "--data.task.init_args.dataset=gcd" in argv[("gym_gcd", "all")]
    with pytest.raises(SystemExit, match="unknown task or variant gsm9k"):
        suite.plan(["gsm9k"], ["all"])


def test_a_quick_suite_trains_and_scores_each_variant(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "TASKS", {"debug": ("debug.yaml", [], suite.COT)})
    monkeypatch.setattr(suite, "RUNS", tmp_path / "runs")
    result = bench_main(["suite", "--quick", "--tasks", "debug", "--variants", "all,none", "--out-dir", str(tmp_path)])
    assert set(result["tasks"]["debug"]) == {"all", "none"}
    assert all(0.0 <= a <= 1.0 for a in result["tasks"]["debug"].values())
    params = result["trainable_params"]["debug"]
    assert params["all"] > params["none"] > 0  # the feedback path's parameters
    assert result["memory_params"]["debug"]["all"] == result["memory_params"]["debug"]["none"] > 0
    assert (tmp_path / "runs" / "debug-none").is_dir()
    assert "--model.reasoner.feedback=none" in result["commands"]["debug"]["none"]


def test_a_suite_of_some_tasks_keeps_the_other_tasks_results(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(suite, "TASKS", {"a": ("debug.yaml", [], None), "b": ("debug.yaml", [], None)})
    scores = {"a": 0.25, "b": 0.75}

    def fit_and_score(argv):
        root = next(a for a in argv if a.startswith("--trainer.default_root_dir="))
        return {"accuracy": scores[root.rsplit("/", 1)[-1].split("-")[0]], "accuracy_oracle": 0.5,
                "fit_seconds": 1.0, "trainable_params": 10, "memory_params": 20}

    monkeypatch.setattr(suite, "fit_and_score", fit_and_score)
    monkeypatch.setattr(suite, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(suite, "QUICK", [])
    bench_main(["suite", "--tasks", "a", "--variants", "all", "--out-dir", str(tmp_path)])
    bench_main(["suite", "--tasks", "b", "--variants", "all", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "suite.json").read_text())
    assert result["tasks"] == {"a": {"all": 0.25}, "b": {"all": 0.75}}
    assert set(result["commands"]) == {"a", "b"} and not list(tmp_path.glob("suite.partial*"))


def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "TASKS", {"bad": ("debug.yaml", [], None), "good": ("debug.yaml", [], None)})
    monkeypatch.setattr(suite, "RUNS", tmp_path / "runs")

    def fit_and_score(argv):
        if any(a.endswith("/bad-all") for a in argv):
            raise ValueError("found only 0 valid questions")
        return {"accuracy": 0.5, "accuracy_oracle": 0.5, "fit_seconds": 1.0, "trainable_params": 1, "memory_params": 1}

    monkeypatch.setattr(suite, "fit_and_score", fit_and_score)
    result = bench_main(["suite", "--quick", "--tasks", "bad,good", "--variants", "all", "--out-dir", str(tmp_path)])
    assert result["tasks"] == {"good": {"all": 0.5}}
    assert result["failed"] == {"bad": {"all": "ValueError: found only 0 valid questions"}}


def test_suites_run_side_by_side_keep_each_others_results(tmp_path, monkeypatch):
    """Suite b starts before suite a has written suite.json and finishes after it: a's result
    survives, and a failure that b has now run successfully is dropped."""
    import json

    monkeypatch.setattr(suite, "TASKS", {"a": ("debug.yaml", [], None), "b": ("debug.yaml", [], None)})
    monkeypatch.setattr(suite, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(suite, "QUICK", [])
    (tmp_path / "suite.json").write_text(json.dumps({"tasks": {}, "failed": {"b": {"all": "ValueError: x"}}}))

    def fit_and_score(argv):
        if any(a.endswith("/b-all") for a in argv):  # while b trains, suite a finishes and writes
            bench_main(["suite", "--tasks", "a", "--variants", "all", "--out-dir", str(tmp_path)])
        return {"accuracy": 0.5, "accuracy_oracle": 0.5, "fit_seconds": 1.0, "trainable_params": 1, "memory_params": 1}

    monkeypatch.setattr(suite, "fit_and_score", fit_and_score)
    bench_main(["suite", "--tasks", "b", "--variants", "all", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "suite.json").read_text())
    assert result["tasks"] == {"a": {"all": 0.5}, "b": {"all": 0.5}}
    assert result.get("failed", {}) == {}


def test_the_zero_latent_and_larger_memory_baselines_are_overrides_of_the_same_config():
    argv = {v: a for _, v, a in suite.plan(["gym_aiw"], ["latent0", "smollm2"])}
    assert "--data.latent_steps=0" in argv["latent0"]
    # a config whose steps are labelled latent steps (ProntoQA, ICoT) loses them too
    assert "--data.steps=none" in argv["latent0"]
    assert "--model.memory.init_args.name=smollm2-135m" in argv["smollm2"]
    assert argv["latent0"][:3] == argv["smollm2"][:3] == ["fit", "--config", str(suite.ROOT / "configs" / "reasoning_gym.yaml")]
    assert suite.DEFAULT_VARIANTS == ["all", "none", "last", "cot"]  # the costly ones run only when named


def test_train_speed_builds_every_config_it_times_without_benchmark_files():
    """The ProsQA config reads its names from the valid file; the speed bench must not need it."""
    from split_model.bench.train_speed import CONFIGS, load_config
    from split_model.tasks import get_task

    for name in CONFIGS:
        _, _, class_path, task_args = load_config(name, batches=1)
        assert not any(str(v).startswith("${") for v in task_args.values()), (name, task_args)
        if class_path.endswith("ProsQA"):
            assert len(get_task("prosqa", **task_args).examples("train")) == 32


def test_a_rerun_sets_the_earlier_runs_folder_aside(tmp_path, monkeypatch):
    """The run folder's last.ckpt is the model the new entry scored: the earlier run's folder
    moves to TASK-VARIANT.previous (one kept), it is not mixed with the new run's files."""
    monkeypatch.setattr(suite, "TASKS", {"a": ("debug.yaml", [], None)})
    monkeypatch.setattr(suite, "RUNS", tmp_path / "runs")
    runs = iter(["first", "second", "third"])

    def fit_and_score(argv):
        root = next(a for a in argv if a.startswith("--trainer.default_root_dir=")).split("=", 1)[1]
        ckpt = tmp_path / "runs" / "a-all" / "checkpoints"
        assert str(ckpt.parent) == root and not ckpt.parent.exists()  # a fresh folder for every run
        ckpt.mkdir(parents=True)
        (ckpt / "last.ckpt").write_text(next(runs))
        return {"accuracy": 0.5, "accuracy_oracle": 0.5, "fit_seconds": 1.0, "trainable_params": 1, "memory_params": 1}

    monkeypatch.setattr(suite, "fit_and_score", fit_and_score)
    for _ in range(3):
        bench_main(["suite", "--quick", "--tasks", "a", "--variants", "all", "--out-dir", str(tmp_path)])
    assert (tmp_path / "runs" / "a-all" / "checkpoints" / "last.ckpt").read_text() == "third"
    assert (tmp_path / "runs" / "a-all.previous" / "checkpoints" / "last.ckpt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a-all", "a-all.previous"]


@pytest.mark.parametrize("task", ["prosqa", "prontoqa", "icot_4x4", "gsm8k"])
def test_every_baseline_of_a_benchmark_config_is_a_data_setup_the_formatter_takes(task, capsys):
    """A variant's overrides must fit the config they override: ProsQA labels sets over a fixed
    count of latent steps, which written steps (cot) and no steps (latent0) have to undo."""
    import yaml

    from split_model.cli import dispatch
    from split_model.memory.tokenizer import ByteTokenizer
    from split_model.training.format import Formatter

    for _, variant, argv in suite.plan([task], ["all", "cot", "latent0"]):
        with pytest.raises(SystemExit) as done:
            dispatch([*argv, "--print_config"])
        assert done.value.code in (0, None), variant
        data = yaml.safe_load(capsys.readouterr().out)["data"]
        f = Formatter(ByteTokenizer(), data["steps"], data["latent_steps"], step_token=data["step_token"],
                      fixed_steps=data["fixed_steps"])
        assert f.steps == {"cot": "text", "latent0": "none"}.get(variant, f.steps), variant


def test_the_suite_prints_its_results_as_a_table_of_tasks_by_variant():
    text = suite.table({"gym_gcd": {"all": 0.98912}, "prosqa": {"none": 0.5, "all": 0.597}})
    assert text.splitlines() == ["| task | all | none |", "|---|---|---|",
                                 "| prosqa | 0.597 | 0.500 |", "| gym_gcd | 0.989 | - |"]


def test_memory_parameters_are_kept_per_variant_and_an_older_records_one_number_is_spread_over_its_variants():
    """The smollm2 variant reads another memory: its count must not replace the others'. A
    suite.json written when a task had one count keeps it for the variants it held then."""
    earlier = {"tasks": {"a": {"all": 0.9, "none": 0.8}}, "memory_params": {"a": 22_713_216}}
    new = {"tasks": {"a": {"smollm2": 0.7}}, "memory_params": {"a": {"smollm2": 134_515_008}}}
    out = suite.merged(earlier, new)
    assert out["memory_params"]["a"] == {"all": 22_713_216, "none": 22_713_216, "smollm2": 134_515_008}
    assert out["tasks"]["a"] == {"all": 0.9, "none": 0.8, "smollm2": 0.7}
    assert suite.merged({"tasks": {}}, new)["memory_params"] == {"a": {"smollm2": 134_515_008}}
