"""The `split-model` command: fit the debug config in-process (and under DDP in two
processes), answer questions from its checkpoint, and explain itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from split_model.cli import dispatch
from split_model.tasks import StateTracking

# jsonargparse deprecations raised inside LightningCLI itself, not by our code.
pytestmark = [pytest.mark.filterwarnings("ignore:(?s).*deprecated in v4.49.0"),
              pytest.mark.filterwarnings("ignore:(?s).*only one JsonargparseDeprecationWarning")]

SMALL_DATA = ["--data.task.init_args.n_train", "64", "--data.task.init_args.n_valid", "16",
              "--data.task.init_args.n_test", "16", "--data.batch_size", "16"]


def fit_args(root, *extra: str) -> list[str]:
    """`fit` of configs/debug.yaml, shortened, with every output under `root`."""
    return ["fit", "--config", "configs/debug.yaml", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.max_steps", "6",
            "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
            "--data.cache_dir", str(root / "cache"), *SMALL_DATA, *extra]


@pytest.fixture(scope="module")
def fitted_cli(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)  # the config path is relative to the repository, as in the README
        mp.setattr(sys, "argv", ["split-model"])  # not pytest's arguments
        cli = dispatch(fit_args(root))
    return SimpleNamespace(cli=cli, root=root)


def test_fit_runs_the_debug_config_and_validates(fitted_cli):
    trainer = fitted_cli.cli.trainer
    assert trainer.global_step == 6
    assert "val/accuracy" in trainer.callback_metrics
    assert 0.0 <= float(trainer.callback_metrics["val/accuracy"]) <= 1.0
    # the debug game labels each latent step with the state after a swap: their accuracy is logged
    assert 0.0 <= float(trainer.callback_metrics["train/step_acc"]) <= 1.0
    assert "val/step_acc_teacher_forced" in trainer.callback_metrics
    assert fitted_cli.cli.model.reasoner.cfg.feedback == "all"  # from the YAML
    assert len(fitted_cli.cli.datamodule.datasets["train"]) == 64  # from the command line
    assert (fitted_cli.root / "checkpoints" / "last.ckpt").is_file()  # where `--ckpt_path last` looks
    assert list((fitted_cli.root / "cache").rglob("manifest.json"))


def test_generate_answers_from_the_fitted_checkpoint(fitted_cli, capsys):
    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    questions = [e.question for e in StateTracking(n_items=3, length=3, n_train=4, n_valid=2, n_test=2).examples("test")]
    answers = dispatch(["generate", "--checkpoint", ckpt, "--question", questions[0], "--question", questions[1],
                        "--latent-steps", "3", "--max-new-tokens", "4"])
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == answers


def test_generate_needs_a_question(fitted_cli, capsys):
    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    with pytest.raises(SystemExit) as exit_:
        dispatch(["generate", "--checkpoint", ckpt])
    assert exit_.value.code == 2
    assert "at least one --question" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_prints_the_overview(argv, capsys):
    assert dispatch(argv) is None
    out = capsys.readouterr().out
    assert out.startswith("usage: split-model COMMAND")
    for command in ("fit", "validate", "test", "predict", "generate", "bench", "data"):
        assert f"\n  {command} " in out


def test_unknown_command_exits_with_the_overview(capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatch(["fly"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'fly'" in err and "usage: split-model" in err


def test_fit_trains_with_ddp_in_two_cpu_processes(tiny, tmp_path):
    env = {**os.environ, "SPLIT_MODEL_CACHE": str(tmp_path / "cache_root"), "OMP_NUM_THREADS": "1"}
    argv = fit_args(tmp_path, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2")
    proc = subprocess.run([sys.executable, "-m", "split_model.cli", *argv], cwd=tiny.repo, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output
    assert "validation accuracy" in output


def test_generate_defaults_to_the_trained_number_of_latent_steps(fitted_cli):
    from split_model.training import load_checkpoint

    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    model = load_checkpoint(ckpt)
    assert model.formatter.steps == "latent"
    assert model.formatter.default_latent == 3  # every debug game has 3 swaps, one latent step each


def test_predict_writes_scored_predictions(fitted_cli, tiny, capsys):
    import json

    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    root = fitted_cli.root
    args = ["predict", "--config", "configs/debug.yaml", "--ckpt_path", ckpt, "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--data.cache_dir", str(root / "cache"), *SMALL_DATA]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)
        mp.setattr(sys, "argv", ["split-model"])
        dispatch(args)
    rows = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16  # the whole test split
    assert all(r["score"] == float(r["prediction"] == r["answer"]) for r in rows)
    assert "16 predictions written" in capsys.readouterr().out


def test_a_backbone_is_swapped_by_its_short_name(tiny, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)
        mp.setattr(sys, "argv", ["split-model"])
        cli = dispatch(fit_args(tmp_path, "--model.memory", "minilm-l6", "--trainer.max_steps", "2",
                                "--trainer.val_check_interval", "2"))
    memory = cli.model.memory
    assert memory.spec["name"] == "minilm-l6" and memory.hidden_size == 384
    emb = cli.model.reasoner.embed
    assert emb.vocab_size == memory.tokenizer.vocab_size == 30522
    # output_vocab: task keeps the rows of the ids the reasoner reads and writes, and a shared one
    assert emb.table.shape[0] == len(emb.kept_ids()) + 1 < 100
    assert cli.trainer.global_step == 2


def _ckpt_and_questions(fitted_cli, n: int = 5):
    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    task = StateTracking(n_items=3, length=3, n_train=4, n_valid=2, n_test=n)
    return ckpt, [e.question for e in task.examples("test")]


def test_generate_answers_the_same_in_any_batch_size(fitted_cli, capsys):
    ckpt, questions = _ckpt_and_questions(fitted_cli)
    args = ["generate", "--checkpoint", ckpt, *[a for q in questions for a in ("--question", q)], "--max-new-tokens", "4"]
    assert dispatch(args + ["--batch-size", "2"]) == dispatch(args + ["--batch-size", "64"])


def test_generate_samples_reproducibly_with_a_seed(fitted_cli):
    ckpt, questions = _ckpt_and_questions(fitted_cli)
    args = ["generate", "--checkpoint", ckpt, *[a for q in questions for a in ("--question", q)],
            "--max-new-tokens", "4", "--temperature", "5", "--seed", "3"]
    assert dispatch(args) == dispatch(args)
    greedy = dispatch(["generate", "--checkpoint", ckpt, *[a for q in questions for a in ("--question", q)],
                       "--max-new-tokens", "4"])
    assert dispatch(args[:-2] + ["--top-k", "1", "--seed", "9"]) == greedy


def test_generate_streams_the_answer_as_it_is_written(fitted_cli, capsys):
    ckpt, questions = _ckpt_and_questions(fitted_cli, n=2)
    capsys.readouterr()
    answers = dispatch(["generate", "--checkpoint", ckpt, "--question", questions[0], "--question", questions[1],
                        "--max-new-tokens", "4", "--stream"])
    assert answers == dispatch(["generate", "--checkpoint", ckpt, "--question", questions[0], "--question",
                                questions[1], "--max-new-tokens", "4"])
    streamed = capsys.readouterr().out.splitlines()[:2]
    assert [s.strip() for s in streamed] == answers  # steps=latent: the written text is the answer


def test_generate_refuses_a_missing_or_foreign_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for path, message in ((tmp_path / "none.ckpt", "no checkpoint at"), (tmp_path / "notes.txt", "cannot read checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            dispatch(["generate", "--checkpoint", str(path), "--question", "where is the ball?"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--device", "cuda"], "no CUDA device"),
                                            (["--top-p", "0"], "top_p must be in"),
                                            (["--batch-size", "0"], "must be positive")])
def test_generate_refuses_bad_options_in_one_line(fitted_cli, capsys, extra, message):
    ckpt, questions = _ckpt_and_questions(fitted_cli, n=2)
    with pytest.raises(SystemExit) as exit_:
        dispatch(["generate", "--checkpoint", ckpt, "--question", questions[0], *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_lists_train_speed_and_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatch(["bench", "--help"])
    assert exit_.value.code == 0
    assert "train-speed" in capsys.readouterr().out
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        dispatch(["bench", "train-speed", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_config_parses(tiny, config, capsys, monkeypatch):
    """Each committed config is valid for the CLI (types, class paths, callbacks such as the
    curriculum's stages), checked without building anything."""
    monkeypatch.chdir(tiny.repo)
    monkeypatch.setattr(sys, "argv", ["split-model"])
    with pytest.raises(SystemExit) as done:
        dispatch(["fit", "--config", f"configs/{config}", "--print_config"])
    assert done.value.code in (0, None)
    assert "reasoner:" in capsys.readouterr().out


TEST_FILES = {"prosqa.yaml": "prosqa/prosqa_test.json", "prontoqa.yaml": "prontoqa/prontoqa_test.json",
              "icot_mult_4x4.yaml": "icot_multiplication/4x4/test_bigbench.txt",
              "icot_mult_5x5.yaml": "icot_multiplication/5x5/test_bigbench.txt", "gsm8k.yaml": "gsm8k_aug/test.txt"}


@pytest.mark.parametrize("config", sorted(TEST_FILES))
def test_benchmark_configs_name_the_original_test_files_and_say_when_they_are_missing(tiny, config, tmp_path,
                                                                                       monkeypatch):
    import importlib
    import json

    from omegaconf import OmegaConf

    monkeypatch.setenv("SPLIT_MODEL_BENCHMARKS", str(tmp_path))
    data = OmegaConf.to_container(OmegaConf.load(tiny.repo / "configs" / config)["data"], resolve=True)
    module, cls = data["task"]["class_path"].rsplit(".", 1)
    task = getattr(importlib.import_module(module), cls)(**data["task"]["init_args"])
    want = tmp_path / TEST_FILES[config]
    with pytest.raises(FileNotFoundError, match=f"test file not found: {want}"):
        task.examples("test")
    want.parent.mkdir(parents=True)
    if config == "prontoqa.yaml":  # its latent steps are labelled from the question's facts: a real ProntoQA form
        want.write_text(json.dumps([{"question": "Every wumpus is a dumpus. Dumpuses are not red. Every tumpus is red. "
                                                 "Sally is a wumpus. True or false: Sally is red.",
                                     "steps": ["Sally is a wumpus. Every wumpus is a dumpus.", "Sally is not red."],
                                     "answer": "False"}]))
    elif config == "prosqa.yaml":  # its latent steps are the search's reached sets: a real ProsQA item's graph
        want.write_text(json.dumps([{"question": "Every wumpus is a dumpus. Every rempus is a tumpus. Tom is a wumpus. "
                                                 "Is Tom a dumpus or tumpus?",
                                     "steps": ["Tom is a wumpus.", "Every wumpus is a dumpus."],
                                     "answer": "Tom is a dumpus.", "idx_to_symbol": ["Tom", "wumpus", "dumpus", "rempus",
                                                                                     "tumpus"],
                                     "edges": [[0, 1], [1, 2], [3, 4]], "root": 0, "target": 2, "neg_target": 4}]))
    else:
        want.write_text("1 2 3 4 * 5 6 7 8||5 1 7 0 2 #### 5 6 5 3 7 8 7 3\n")  # 4321 * 8765: the configs check it
    assert len(task.examples("test")) == 1  # present: read like any split (and scored by the same step as valid)


def test_data_prosqa_writes_a_set_and_compares_its_statistics_with_a_real_file(tmp_path, capsys):
    import json

    from split_model.tasks import generate_prosqa

    real = tmp_path / "real.json"
    real.write_text(json.dumps(generate_prosqa(20, seed=9)))
    dispatch(["data", "prosqa", "--out", str(tmp_path / "gen.json"), "-n", "30", "--compare", str(real)])
    out = capsys.readouterr().out
    assert len(json.loads((tmp_path / "gen.json").read_text())) == 30
    assert "| statistic (mean per item) | generated | real.json |" in out and "| items | 30 | 20 |" in out
    with pytest.raises(SystemExit):
        dispatch(["data", "prosqa", "--out", str(tmp_path / "g2.json"), "--compare", str(tmp_path / "nope.json")])
    assert "--compare: no file at" in capsys.readouterr().err and not (tmp_path / "g2.json").exists()
    dispatch(["data", "prosqa", "--out", str(tmp_path / "named.json"), "-n", "10", "--vocabulary", str(real)])
    names = {s for item in json.loads((tmp_path / "named.json").read_text()) for s in item["idx_to_symbol"]}
    assert names <= {s for item in json.loads(real.read_text()) for s in item["idx_to_symbol"]}


def test_data_prontoqa_prints_a_files_statistics_and_refuses_what_it_cannot_read(tmp_path, capsys):
    import json

    question = ("Every wumpus is a dumpus. Dumpuses are not luminous. Each jompus is luminous. Sally is a wumpus. "
                "True or false: Sally is luminous.")
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"question": question, "steps": [], "answer": "False"}]))
    dispatch(["data", "prontoqa", "--stats", str(path)])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats == {"items": 1, "true_share": 0.0, "backward_steps_share": {"3": 1.0}, "reached_goal_linked_share": 1.0}
    other = ("Every yumpus is a rompus. Every rompus is a numpus. Every numpus is a zumpus. Yumpuses are hot. "
             "Max is a yumpus. True or false: Max is hot.")  # brings the classes a chain above jompus takes
    path.write_text(json.dumps([{"question": question, "steps": [], "answer": "False"},
                                {"question": other, "steps": [], "answer": "True"}]))
    dispatch(["data", "prontoqa", "--stats", str(path), "--without-link-cue", str(tmp_path / "nocue.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["reached_goal_linked_share"] == 0.5 and "wrote 2 questions" in lines[1]
    assert json.loads(lines[-1])["reached_goal_linked_share"] == 0.0
    assert len(json.loads((tmp_path / "nocue.json").read_text())) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Sally sings.", "steps": [], "answer": "True"}]))
    for argv, message in ((["--stats", str(tmp_path / "nope.json")], "--stats: no file at"),
                          (["--stats", str(bad)], "item 0: a ProntoQA question ends with"),
                          ([], "give --stats FILE"),
                          (["--stats", str(path), "--without-link-cue", str(path)], "would overwrite the --stats file")):
        with pytest.raises(SystemExit):
            dispatch(["data", "prontoqa", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dispatch(["data", "prosqa", "--stats", str(path)])
    assert "--stats and --without-link-cue apply to prontoqa only" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_status_1_with_the_traceback_on_request(tiny, capsys, monkeypatch):
    from split_model.cli import main

    monkeypatch.chdir(tiny.repo)
    monkeypatch.setattr(sys, "argv", ["split-model"])
    argv = ["fit", "--config", "configs/debug.yaml", "--model.memory=gpt-17"]
    monkeypatch.delenv("SPLIT_MODEL_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("split-model: error: unknown backbone 'gpt-17'") and "Traceback" not in "".join(err)
    monkeypatch.setenv("SPLIT_MODEL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown backbone 'gpt-17'"):
        main(argv)


def test_validate_with_a_checkpoint_searches_the_store_it_is_given(tiny, tmp_path):
    """With --ckpt_path Lightning replaces the model's settings by the checkpoint's; the store
    named on the command line must still be the one searched."""
    import yaml

    from split_model.memory import HFMemory
    from split_model.retrieval import RetrievalStore

    spec = yaml.safe_load((tiny.repo / "configs" / "debug.yaml").read_text())["model"]["memory"]["init_args"]
    memory = HFMemory(**spec)
    for name in ("a", "b"):
        RetrievalStore.build(tmp_path / name, memory, ["ball at 0.", "swap 1 2.", f"store {name}."])
    retrieving = ["--model.reasoner.retrieval_k=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)
        mp.setattr(sys, "argv", ["split-model"])
        fitted = dispatch(fit_args(tmp_path, *retrieving, f"--model.store={tmp_path / 'a'}", "--trainer.max_steps=2"))
        ckpt = fitted.trainer.checkpoint_callback.last_model_path
        cli = dispatch(["validate", "--config", "configs/debug.yaml", "--ckpt_path", ckpt, *SMALL_DATA, *retrieving,
                        f"--model.store={tmp_path / 'b'}", "--data.cache_dir", str(tmp_path / "cache"),
                        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                        str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert fitted.model.store.path == tmp_path / "a"
    assert cli.model.store.path == tmp_path / "b"


def test_validate_names_each_setting_the_checkpoint_replaces(fitted_cli, tiny, capfd):
    """A model setting asked for on the command line that the checkpoint overrides is named on
    stderr with both values; settings equal to the checkpoint's are not named."""
    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    root = fitted_cli.root / "validate-override"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)
        mp.setattr(sys, "argv", ["split-model"])
        cli = dispatch(["validate", "--config", "configs/debug.yaml", "--ckpt_path", ckpt, *SMALL_DATA,
                        "--model.reasoner.feedback=none", "--data.cache_dir", str(fitted_cli.root / "cache"),
                        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                        "--trainer.enable_progress_bar", "false"])
    assert cli.model.reasoner.cfg.feedback == "all"  # the checkpoint's, as trained
    lines = [line for line in capfd.readouterr().err.splitlines() if "--ckpt_path sets the model's settings" in line]
    assert len(lines) == 1
    assert lines[0].endswith("these of the config and command line: model.reasoner.feedback: 'none' -> 'all'")


def test_rl_fine_tunes_a_fitted_checkpoint_from_the_command_line(fitted_cli, tiny, tmp_path):
    """The recipe's last step as a user runs it: `fit` with objective rl, starting from another
    run's checkpoint (model.init_from), logs rewards and writes its own checkpoint."""
    ckpt = fitted_cli.cli.trainer.checkpoint_callback.last_model_path
    root = tmp_path / "rl"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.repo)
        mp.setattr(sys, "argv", ["split-model"])
        cli = dispatch(fit_args(root, "--model.objective=rl", f"--model.init_from={ckpt}", "--model.rl.group_size=4",
                                "--model.rl.trainable=feedback_only", "--trainer.max_steps=3"))
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert {"train/reward", "train/kl", "train/reward_std", "val/accuracy"} <= set(metrics)
    import torch

    start = torch.load(ckpt, weights_only=True)["state_dict"]
    now = cli.model.state_dict()
    kept = [k for k in start if k.startswith("reasoner.") and not k.startswith("reasoner.feedback.")]
    assert kept and all(torch.equal(now[k], start[k]) for k in kept)  # feedback_only: the rest is the checkpoint's
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_a_second_fresh_fit_in_the_same_folder_says_the_earlier_checkpoint_is_kept(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tiny.repo)
    monkeypatch.setattr(sys, "argv", ["split-model"])
    dispatch(fit_args(tmp_path, "--trainer.max_steps", "2"))
    first = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    assert "is an earlier run's" not in capfd.readouterr().err
    dispatch(fit_args(tmp_path, "--trainer.max_steps", "2", "--seed_everything", "1"))
    out, err = capfd.readouterr()
    assert f"{tmp_path / 'checkpoints' / 'last.ckpt'} is an earlier run's and is kept" in err
    assert "pass --ckpt_path last" in err
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'last-v1.ckpt'}" in out  # where this run's went
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == first
