"""The `split-model` command.

fit / validate / test / predict come from LightningCLI (configs in omegaconf mode, so
`${...}` interpolation works in YAML); generate, bench and data are the project's own.
Every entry point is a function taking argv, so tests drive the CLI in-process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

OVERVIEW = """usage: split-model COMMAND [options]

A small recurrent reasoner with full neuralese feedback that reads a frozen memory transformer.

commands:
  fit        train from a config:      split-model fit --config configs/quickstart.yaml
  validate   score a checkpoint:       split-model validate --config CFG --ckpt_path CKPT
  test       score on the test split:  split-model test --config CFG --ckpt_path CKPT
  predict    write test predictions:   split-model predict --config CFG --ckpt_path CKPT
  generate   answer questions:         split-model generate --checkpoint CKPT --question "..."
  bench      run a named experiment:   split-model bench NAME   (speed, feedback-ablation, quickstart)
  data       write generated data:     split-model data prosqa --out data/prosqa_train.json
             (or describe a file:      split-model data prontoqa --stats prontoqa_valid.json)
  index      build a retrieval store:  split-model index --corpus corpus.jsonl --out stores/corpus

`split-model COMMAND --help` explains every option of a command; for fit/validate/test/predict,
`--print_config` shows the full resolved config.
"""


def run_lightning(argv: list[str] | None):
    """LightningCLI over SplitModelModule and TaskDataModule; returns the CLI object.

    argv None reads sys.argv, which must stay intact: the DDP launcher re-runs it per process.
    """
    import warnings

    from lightning.pytorch.cli import LightningCLI

    # The frozen memory is in eval mode on purpose; Lightning warns about every such module.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

    from lightning.pytorch.callbacks import ModelCheckpoint

    from split_model.training import SplitModelModule, TaskDataModule, attach_prediction_writer
    from split_model.training.checkpoints import CHECKPOINT_DEFAULTS, default_checkpoint_dir

    class SplitModelCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # Checkpoints for resuming (`fit --ckpt_path last`), configurable as `checkpoint:`.
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})

        def _parse_ckpt_path(self) -> None:
            # With --ckpt_path, Lightning replaces the model's settings by the checkpoint's. The
            # retrieval store is what the model searches, not what it learned: the config's and
            # the command line's store stays (validate on another world by naming its store).
            # Every setting the checkpoint replaces (the store too, where none was given) is named
            # on stderr, so that an override such as --model.reasoner.retrieval_k=8 is never
            # dropped without a word.
            sub = self.config.get("subcommand")
            model = self.config[sub].get("model") if sub else None
            store = None if model is None else model.get("store")
            asked = {} if model is None else flat_settings(model.as_dict())
            super()._parse_ckpt_path()
            if store is not None:
                self.config[sub]["model"]["store"] = store
            if model is not None:
                replaced = replaced_settings(asked, flat_settings(self.config[sub]["model"].as_dict()))
                if replaced:
                    print("split-model: --ckpt_path sets the model's settings; the checkpoint's values replace "
                          "these of the config and command line: " + "; ".join(replaced), file=sys.stderr)

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand, self.config)
            if config.get("checkpoint") is not None and config["checkpoint"].get("dirpath") is None:
                root = config["trainer"].get("default_root_dir") or "."
                config["checkpoint"]["dirpath"] = default_checkpoint_dir(root)

        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            # The data needs the backbone (to cache its states) and the model the data's format.
            self.datamodule.connect(self.model)

        def before_fit(self) -> None:
            # Lightning never overwrites a checkpoint a fresh run finds in its folder: it saves
            # last-v1.ckpt beside it, and a later `--ckpt_path .../last.ckpt` would read the old run.
            callback = self.trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None)
            if (dirpath and getattr(callback, "save_last", False) and self.config[self.subcommand].get("ckpt_path") is None
                    and (Path(dirpath) / "last.ckpt").is_file() and self.trainer.is_global_zero):
                print(f"split-model: {Path(dirpath) / 'last.ckpt'} is an earlier run's and is kept; this run starts "
                      "afresh and saves its last checkpoint under a numbered name (last-v1.ckpt, ...), printed at "
                      "the end. To continue the earlier run, pass --ckpt_path last; to keep runs apart, give each "
                      "its own --trainer.default_root_dir.", file=sys.stderr)

        def after_fit(self) -> None:
            metrics = self.trainer.callback_metrics
            if "val/accuracy" in metrics and self.trainer.is_global_zero:
                n = len(self.datamodule.datasets.get("valid", []))
                print(f"validation accuracy: {float(metrics['val/accuracy']):.4f} ({n} examples)", flush=True)
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or getattr(
                self.trainer.checkpoint_callback, "best_model_path", "")
            if ckpt and self.trainer.is_global_zero:
                print(f"checkpoint: {ckpt}", flush=True)

        def before_predict(self) -> None:
            # Every process's predictions, gathered, once each, in dataset order.
            attach_prediction_writer(self.trainer)

    return SplitModelCLI(
        SplitModelModule,
        TaskDataModule,
        args=argv,
        # exit_on_error False: a bad option raises ArgumentError, which main() prints on one line.
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def generate_main(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(
        prog="split-model generate",
        description="Answer questions with a trained checkpoint. Questions run in batches: the memory reads a "
                    "batch in one pass and the reasoner writes every answer of the batch at once.")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by `split-model fit`")
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--store", default=None, help="a retrieving model: search this store (built by `split-model "
                                                 "index` with the same backbone) instead of the one it was trained with")
    p.add_argument("--file", help="a text file with one question per line")
    p.add_argument("--latent-steps", type=int, default=None,
                   help="latent steps before the answer (default: the most common count in the training "
                        "data; with steps=latent, pass the number of reasoning steps this question needs)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer to write")
    p.add_argument("--batch-size", type=int, default=64, help="questions per batch")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the tokens holding this much probability")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: random)")
    p.add_argument("--stream", action="store_true", help="print each answer's tokens as they are written "
                                                         "(one question at a time)")
    args = p.parse_args(argv)
    questions = list(args.question)
    if args.file:
        from pathlib import Path

        if not Path(args.file).is_file():
            p.error(f"--file {args.file}: no such file")
        questions += [q for q in Path(args.file).read_text().split("\n") if q.strip()]
    if not questions:
        p.error("give at least one --question or a --file")
    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        p.error("--batch-size and --max-new-tokens must be positive")
    if args.latent_steps is not None and args.latent_steps < 0:
        p.error(f"--latent-steps must be >= 0, got {args.latent_steps}")
    import torch

    from split_model.reasoner import Sampling
    from split_model.training import load_checkpoint

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        model = load_checkpoint(args.checkpoint, store=args.store).to(device)
    except (FileNotFoundError, ValueError) as e:  # a wrong path, a foreign or damaged file, another backbone
        p.error(str(e))
    n_latent = args.latent_steps if args.latent_steps is not None else model.formatter.default_latent
    kwargs = {"n_latent": n_latent, "max_new_tokens": args.max_new_tokens, "sampling": sampling}
    if args.stream:
        return [stream_answer(model, q, kwargs) for q in questions]
    answers = []
    for i in range(0, len(questions), args.batch_size):
        answers += model.generate(questions[i : i + args.batch_size], **kwargs)
    for a in answers:
        print(a)
    return answers


def stream_answer(model, question: str, kwargs: dict) -> str:
    """Print one answer's text as the reasoner writes it; returns the decoded answer."""
    tok, written, shown = model.memory.tokenizer, [], [""]

    def on_token(ids, writing):
        if bool(writing[0]):
            written.append(int(ids[0]))
            text = tok.decode(written)  # whole text each time: tokens may be pieces of a word
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    (answer,) = model.generate([question], on_token=on_token, **kwargs)
    print(flush=True)
    return answer


def data_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="split-model data",
                                description="Write a generated data set to a file (prosqa) or a directory (world), "
                                            "or describe a ProntoQA file (prontoqa --stats FILE).")
    p.add_argument("kind", choices=["prosqa", "world", "prontoqa"],
                   help="prosqa: ProsQA-style graph questions in Coconut's JSON format; "
                        "world: a knowledge world's corpus and its valid multi-hop questions; "
                        "prontoqa: print the statistics of a ProntoQA JSON file (--stats)")
    p.add_argument("--out", default=None, help="prosqa: output file, e.g. data/prosqa_train.json; "
                                               "world: output directory (gets corpus.txt and questions.jsonl)")
    p.add_argument("--stats", metavar="FILE", default=None,
                   help="prontoqa only: a ProntoQA JSON file (e.g. prontoqa_valid.json) whose statistics to print: "
                        "backward-chaining steps, True share, and how often the goal the person reaches is the "
                        "only goal any 'is a' fact names (a shortcut past the chain)")
    p.add_argument("--without-link-cue", metavar="OUT", default=None,
                   help="prontoqa only: also write --stats FILE's questions to OUT with facts added that give "
                        "the goal the person does not reach a chain of 3 classes above it, each with a property, "
                        "and 2 classes below (proof and answer unchanged): the shortcut is gone, the chain must "
                        "be followed; --seed picks the added classes and places")
    p.add_argument("-n", "--n", type=int, default=None,
                   help="number of examples (prosqa: default 10000; world: valid questions, default 400)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--compare", metavar="FILE", default=None,
                   help="a real ProsQA JSON file (e.g. prosqa_valid.json): print both sets' statistics side by side")
    p.add_argument("--vocabulary", metavar="FILE", default=None,
                   help="prosqa only: draw person and concept names from this ProsQA JSON file (e.g. prosqa_valid.json: "
                        "the public files' 55 names) instead of the built-in lists")
    p.add_argument("--world", type=int, nargs="+", default=None,
                   help="world only: which world, 0-7 (default 0); several (--world 0 2 3) write their pooled "
                        "corpus and questions, as a config's `world: [0, 2, 3]` reads them")
    p.add_argument("--entities", type=int, default=None, help="world only: number of people per world (default 500)")
    args = p.parse_args(argv)
    import json

    from split_model.tasks import (ProsQAGenConfig, prontoqa_statistics, prontoqa_without_link_cue, prosqa_statistics,
                                   prosqa_vocabulary, write_prosqa, write_world)

    if args.kind == "prontoqa":
        from split_model import files
        from split_model.tasks.coconut_json import read_coconut_items

        if args.stats is None or args.out is not None:
            p.error("prontoqa describes a file: give --stats FILE (and no --out)")
        if not Path(args.stats).is_file():
            p.error(f"--stats: no file at {args.stats}")
        if args.without_link_cue is not None and Path(args.without_link_cue).resolve() == Path(args.stats).resolve():
            p.error("--without-link-cue would overwrite the --stats file: give another OUT")
        try:
            items = read_coconut_items(Path(args.stats))
            print(json.dumps(prontoqa_statistics(items)))
            if args.without_link_cue is not None:
                unlinked = prontoqa_without_link_cue(items, seed=args.seed)
                stats = prontoqa_statistics(unlinked)
        except ValueError as err:
            p.error(f"--stats {args.stats}: {err}")
        if args.without_link_cue is not None:
            files.write_text(Path(args.without_link_cue), json.dumps(unlinked, indent=1) + "\n")
            print(f"wrote {len(unlinked)} questions without the link cue to {args.without_link_cue}")
            print(json.dumps(stats))
        return
    if args.stats is not None or args.without_link_cue is not None:
        p.error("--stats and --without-link-cue apply to prontoqa only")
    if args.out is None:
        p.error(f"{args.kind} writes data: give --out")
    if args.kind == "world":
        if args.compare is not None or args.vocabulary is not None:
            p.error("--compare and --vocabulary apply to prosqa only")
        given = {"world": args.world, "n_entities": args.entities, "n_valid": args.n}  # a one-world list is that world
        corpus, questions = write_world(args.out, seed=args.seed, **{k: v for k, v in given.items() if v is not None})
        n_docs, n_questions = (len(path.read_text().splitlines()) for path in (corpus, questions))
        print(f"wrote {n_docs} documents to {corpus} and {n_questions} valid questions to {questions}")
        return
    if args.world is not None or args.entities is not None:
        p.error("--world and --entities apply to world only")
    args.n = 10000 if args.n is None else args.n
    for flag, given in (("--compare", args.compare), ("--vocabulary", args.vocabulary)):
        if given is not None and not Path(given).is_file():
            p.error(f"{flag}: no file at {given}")
    config = ProsQAGenConfig(**prosqa_vocabulary(args.vocabulary)) if args.vocabulary else None
    path = write_prosqa(args.out, args.n, seed=args.seed, config=config)
    print(f"wrote {args.n} examples to {path}")
    if args.compare is not None:
        ours = prosqa_statistics(json.loads(path.read_text()))
        real = prosqa_statistics(json.loads(Path(args.compare).read_text()))
        print(f"| statistic (mean per item) | generated | {Path(args.compare).name} |\n|---|---|---|")
        for key in ours:
            print(f"| {key} | {ours[key]} | {real[key]} |")


def index_main(argv: list[str]):
    """`split-model index`: a retrieval store from a corpus file; returns the store."""
    p = argparse.ArgumentParser(
        prog="split-model index",
        description="Read a corpus with a frozen memory backbone into a retrieval store (faiss index of chunk keys, "
                    "memory-mapped chunk states, manifest). A store is built once and refuses any other backbone.")
    p.add_argument("--corpus", required=True, help="a .jsonl (or .json) file with a `text` field per line, or any "
                                                   "other file as plain text with one document per line")
    p.add_argument("--out", required=True, help="directory of the store; must not exist, unless --append")
    p.add_argument("--memory", default="minilm-l6",
                   help="the backbone: a packaged short name (minilm-l6, smollm2-135m) or a local Hugging Face "
                        "directory; a model later reads the store only with this same backbone")
    p.add_argument("--layers", default="-1", help="memory layers whose states are stored, comma-separated "
                                                  "(0: embeddings, -1: last; write --layers=-2,-1 for a list "
                                                  "starting with a minus)")
    p.add_argument("--key-layers", default="last", choices=["last", "all"],
                   help="what a chunk's key averages over its tokens: the last stored layer, or every stored layer "
                        "(each layer's mean normalised first); with --layers=0,-1, all keys a chunk by its words "
                        "as well as its sentence, so a query can match a name exactly")
    p.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq"],
                   help="flat: exact search; hnsw: graph, approximate, fast on big stores; ivfpq: clustered and "
                        "compressed to --pq-m bytes per key, for stores past RAM")
    p.add_argument("--metric", default="ip", choices=["ip", "l2"],
                   help="ip: cosine of L2-normalised keys; l2: euclidean distance")
    p.add_argument("--chunk-tokens", type=int, default=32,
                   help="most token ids per chunk: a longer document is split into consecutive chunks")
    p.add_argument("--ivf-lists", type=int, default=None, help="ivfpq: inverted lists (default about 4*sqrt(chunks))")
    p.add_argument("--pq-m", type=int, default=16, help="ivfpq: bytes per compressed key; must divide the key dimension")
    p.add_argument("--nprobe", type=int, default=16, help="ivfpq: lists scanned per query")
    p.add_argument("--append", action="store_true",
                   help="add the corpus to the store at --out (built by the same backbone); the index options "
                        "and --key-layers are the store's and cannot change")
    p.add_argument("--device", default="auto", help="where the backbone encodes: auto (cuda when available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the ivfpq training sample")
    args = p.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers must be comma-separated integers such as -1 or 2,4; got {args.layers!r}")
    import time

    import torch

    from split_model.memory import HFMemory
    from split_model.retrieval import IndexSpec, RetrievalStore, read_corpus

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.chunk_tokens < 1:
        p.error(f"--chunk-tokens must be at least 1, got {args.chunk_tokens}")
    texts = read_corpus(args.corpus)
    start = time.perf_counter()
    try:  # a chunk is the longest input the memory reads here (max_length is not in the fingerprint)
        memory = HFMemory(name=args.memory, layers=layers, max_length=args.chunk_tokens).to(device)
    except ValueError as e:
        if "exceeds the backbone" not in str(e):
            raise
        p.error(f"--chunk-tokens {args.chunk_tokens} is more than the backbone reads at once ({e})")
    if args.append:
        store = RetrievalStore.open(args.out, memory)
        before = store.num_chunks
        store.append(memory, texts)
        print(f"added {store.num_chunks - before:,} chunks of {len(texts):,} documents to {args.out}: now "
              f"{store.num_chunks:,} chunks of {store.num_documents:,} documents, key dim {store.key_dim}, "
              f"{store.spec.kind} index, {time.perf_counter() - start:.1f} s")
        return store
    spec = IndexSpec(kind=args.index, metric=args.metric, ivf_lists=args.ivf_lists, pq_m=args.pq_m, nprobe=args.nprobe)
    store = RetrievalStore.build(args.out, memory, texts, index=spec, chunk_tokens=args.chunk_tokens,
                                 desc=Path(args.corpus).name, seed=args.seed, key_layers=args.key_layers)
    keyed = "the last stored layer" if store.key_layers == "last" else "every stored layer"
    print(f"indexed {store.num_chunks:,} chunks of {store.num_documents:,} documents, key dim {store.key_dim} "
          f"(keyed by {keyed}), {spec.kind} index, {time.perf_counter() - start:.1f} s: {args.out}")
    return store


# What a user's input raises (a wrong path, an unknown backbone, a bad value), and a training
# run stopped by a NaN: one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, ImportError)


def _reported_errors() -> tuple[type[BaseException], ...]:
    from split_model.training.module import NonFiniteError

    return (*USER_ERRORS, NonFiniteError)


def flat_settings(settings: dict, prefix: str = "model") -> dict[str, object]:
    """Nested settings as {"model.reasoner.feedback": "all", ...}."""
    out: dict[str, object] = {}
    for key, value in settings.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flat_settings(value, name))
        else:
            out[name] = value
    return out


def replaced_settings(asked: dict[str, object], used: dict[str, object]) -> list[str]:
    """One line "name: asked -> used" per setting whose value changed."""
    return [f"{name}: {asked[name]!r} -> {used[name]!r}" for name in sorted(asked.keys() & used.keys())
            if asked[name] != used[name]]


def one_line(error: BaseException) -> str:
    """The error's message on one line. A config value that fails every type of a union
    (e.g. `memory: HFMemory | str`) reports each type's error: keep the ones that say why."""
    text = str(error)
    if text.startswith("Does not validate against any of the Union subtypes"):
        reasons = [line.strip()[2:] for line in text.splitlines()
                   if line.strip().startswith("- ") and not line.strip().startswith("- Expected a")]
        text = "; ".join(reasons) or text
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user error prints one line and exits with status 1, an option or
    config value the parser refuses with status 2 (the traceback too when SPLIT_MODEL_TRACEBACK=1)."""
    import os

    try:
        dispatch(argv)
    except argparse.ArgumentError as e:  # an option or config value the parser refused
        if os.environ.get("SPLIT_MODEL_TRACEBACK", "") not in ("", "0"):
            raise
        command = (sys.argv[1:] if argv is None else list(argv) or ["COMMAND"])[0]
        print(f"split-model: error: {one_line(e)} (`split-model {command} --help` lists the options)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except _reported_errors() as e:
        if os.environ.get("SPLIT_MODEL_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"split-model: error: {one_line(e)} (SPLIT_MODEL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def dispatch(argv: list[str] | None = None):
    """Run one command; returns what it produced (the LightningCLI object, answers, a result dict)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(OVERVIEW)
        return None
    command, rest = args[0], args[1:]
    if command == "generate":
        return generate_main(rest)
    if command == "bench":
        from split_model.bench import bench_main

        return bench_main(rest)
    if command == "data":
        return data_main(rest)
    if command == "index":
        return index_main(rest)
    if command in LIGHTNING_COMMANDS:
        return run_lightning(argv if argv is None else args)
    print(f"split-model: unknown command {command!r}\n\n{OVERVIEW}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
