r"""LoRA (or full) fine-tuning on {context, target} jsonl with transformers Trainer + peft.

    python -m finetune.train --base-model DIR --data-dir data --output-dir runs/NAME \
        [--config finetune/configs/X.yaml] [--method lora|full] [--epochs N] [--max-steps N] [--resume]

Multi-GPU: the same command under `torchrun --nproc_per_node N -m finetune.train ...` or
`accelerate launch -m finetune.train ...` (DDP). Outputs in runs/NAME/:
adapter/ (best by eval loss; model/ with --method full), checkpoints/, train_log.jsonl (loss, lr,
eval loss, and at each evaluation a few dev rows answered and parsed: see finetune/sample_decode.py),
train_config.json, schema.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import dataset
from core.config import parse_config
from core.families import (
    WEIGHT_PATTERNS,
    Family,
    LaneError,
    family_of_dir,
    load_model,
    load_tokenizer,
    torch_dtype,
)
from core.safe_io import (
    OLD_MARK,
    TMP_MARK,
    OutputError,
    OutputLock,
    atomic_write,
    atomic_write_json,
    check_writable,
    recover_dir,
    replace_dir,
    side_dir,
)
from finetune import data as D
from finetune.sample_decode import make_sample_decode_callback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TrainConfig:
    base_model: str = field(metadata={"help": "local directory of the base model (never a hub id)"})
    output_dir: str = field(metadata={"help": "run directory, e.g. runs/NAME"})
    data_dir: str = field(default="data", metadata={"help": "folder with the train (and dev) jsonl"})
    config: str | None = field(default=None, metadata={"help": "YAML preset; flags given here override it"})
    method: str = field(default="lora", metadata={"help": "lora or full", "choices": ["lora", "full"]})
    epochs: float = field(default=3.0, metadata={"help": "training epochs (ignored when --max-steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: use epochs)"})
    batch_size: int = field(default=4, metadata={"help": "rows per device per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: str | None = field(
        default=None, metadata={"help": "comma-separated module names (default: family's)"}
    )
    negative_rows: float = field(
        default=0.0,
        metadata={"help": "add extraction rows answered [] (no triple) from classification texts, this share of "
                          "the extraction rows' count (0: none; the presets use 0.25), so the model learns when "
                          "a text has no relation"},
    )
    max_source_len: int = field(default=400, metadata={
        "help": "prompt tokens kept (training cuts the middle; serving reads the longest start of the text that fits)"})
    max_target_len: int = field(default=300, metadata={"help": "answer tokens kept, end token included"})
    logging_steps: int = 10
    eval_steps: int = field(default=0, metadata={"help": "evaluate and save every N steps (0: about 5 times a run)"})
    save_total_limit: int = 2
    precision: str = field(
        default="auto",
        metadata={"choices": ["auto", "fp32", "fp16", "bf16"], "help": "auto: bf16/fp16 on GPU, fp32 on CPU"},
    )
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "default: on for GPU"})
    group_by_length: bool = True
    sample_decode: int = field(
        default=4,
        metadata={"help": "dev rows answered and parsed at each evaluation, printed and logged (0: off)"},
    )
    seed: int = 42
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (multi-GPU)"})

    def validate(self) -> None:
        """Raise once, listing every problem."""
        problems = []
        base = Path(self.base_model)
        problems += base_model_problems(base)
        if not (Path(self.data_dir) / dataset.TRAIN_FILE).is_file():
            problems.append(f"--data-dir {self.data_dir}: no {dataset.TRAIN_FILE} (run `make data` or copy it there)")
        for name in ("batch_size", "grad_accum", "lora_r", "max_source_len", "max_target_len", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.negative_rows <= 10:
            problems.append(f"--negative-rows must be in [0, 10], got {self.negative_rows}")
        if self.sample_decode < 0:
            problems.append(f"--sample-decode must be >= 0, got {self.sample_decode}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"--max-steps must be -1 or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.append(f"--epochs must be > 0, got {self.epochs}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            problems.append(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            problems.append(f"--deepspeed {self.deepspeed}: file not found")
        if problems:
            raise SystemExit("invalid training config:\n  - " + "\n  - ".join(problems))


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "ice_text.model", "*.tiktoken")


def base_model_problems(base: Path) -> list[str]:
    """What a base model folder lacks, said before transformers would go looking on the hub for it."""
    if not (base / "config.json").is_file():
        return [f"--base-model {base}: no config.json there; give a local model directory"]
    problems = []
    if not any(any(base.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        problems.append(f"--base-model {base}: config.json but no weights (*.safetensors or pytorch_model*.bin); "
                        "copy the whole model folder")
    if not any(any(base.glob(pattern)) for pattern in TOKENIZER_FILES):
        problems.append(f"--base-model {base}: no tokenizer files (tokenizer_config.json, tokenizer.model, ...); "
                        "copy the whole model folder")
    return problems


# --------------------------------------------------------------------------- setup


def resolve_precision(requested: str) -> str:
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested in ("fp16", "bf16") and not torch.cuda.is_available():
        raise SystemExit(f"--precision {requested} needs a CUDA GPU; use fp32 (or auto) on CPU")
    return requested


def build_model(cfg: TrainConfig, family: Family, precision: str):
    """Base model in the training dtype; LoRA adapters (trainable, fp32) on the family's targets."""
    import torch

    # LoRA keeps the frozen base in half precision (fits a 6B model in 16 GB); a full fine-tune keeps
    # fp32 master weights and lets autocast do the half-precision math.
    load_dtype = torch_dtype(precision) if cfg.method == "lora" else torch.float32
    model = load_model(cfg.base_model, family, torch_dtype=load_dtype)
    if load_dtype == torch.float32:
        model = model.float()  # remote-code models may ignore torch_dtype
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else torch.cuda.is_available()
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # so checkpointed blocks get gradients with a frozen embedding
        model.config.use_cache = False
    if cfg.method == "full":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",")] if cfg.lora_targets else list(family.lora_targets)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    model = get_peft_model(model, lora)
    # Trainer's fp16 grad scaler refuses fp16 trainable weights: keep the adapters in fp32.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    head = model.get_base_model().get_output_embeddings()
    if precision in ("fp16", "bf16") and head is not None:
        # Loss in fp32: half-precision logits over a 130k vocabulary overflow.
        head.register_forward_hook(lambda _module, _inputs, out: out.float())
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def auto_eval_steps(cfg: TrainConfig, n_train: int, world_size: int) -> tuple[int, int]:
    """(total optimizer steps, eval interval): about five evaluations per run unless set."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    return total, cfg.eval_steps if cfg.eval_steps > 0 else max(1, total // 5)


def allow_numpy_rng_state_in_checkpoints() -> None:
    """transformers 4.33 reloads rng_state.pth with a bare torch.load, which torch >= 2.6 runs with
    weights_only=True; the file holds numpy's RNG state, so allow exactly those numpy types."""
    import numpy
    import torch

    torch.serialization.add_safe_globals(
        [numpy._core.multiarray._reconstruct, numpy.ndarray, numpy.dtype, numpy.dtypes.UInt32DType]
    )


LOSS_SUM_FILE = "loss_sum.json"  # our addition to a checkpoint: the summed loss of its steps


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a kill or a full disk while the Trainer wrote it), or None.

    The Trainer writes the weights, optimizer.pt, scheduler.pt, trainer_state.json and rng_state*.pth
    in that order, so a complete one has all of them and its state and RNG files read back."""
    import torch

    weights = [*folder.glob("adapter_model.*"), *folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    if not weights:
        return "no model weights"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"no {name}"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__})"
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state.pth"
    for path in rng:
        try:
            torch.load(path, weights_only=False)
        except Exception as err:  # noqa: BLE001 - a torn pickle raises anything from EOFError to RuntimeError
            return f"{path.name} is unreadable ({type(err).__name__})"
    return None


def last_checkpoint(checkpoint_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint-N; incomplete newer ones are named with the reason they are skipped."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    for folder in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"skipping {folder}: incomplete ({problem}), probably written by a run that was killed or ran "
            "out of disk; the Trainer overwrites it when it gets there again")
    return None


def loss_sum_at(checkpoint: Path) -> float | None:
    """The summed training loss of steps 1..N saved with checkpoint-N (None for older checkpoints)."""
    try:
        return float(json.loads((checkpoint / LOSS_SUM_FILE).read_text(encoding="utf-8"))["loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trim_log(log_path: Path, keep_until_step: int) -> None:
    """On resume, drop log lines an interrupted run wrote after the checkpoint it resumes from, and a
    line torn by the kill (the app's reader skips those too)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= keep_until_step:
            kept.append(line)
    atomic_write(log_path, "".join(line + "\n" for line in kept))


def make_log_callback(log_path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """One json line per logging event: step, epoch, loss, lr, eval_loss."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 2)}
            renames = {
                "loss": "loss",
                "learning_rate": "lr",
                "eval_loss": "eval_loss",
                "train_loss": "train_loss_mean",
                "train_runtime": "train_runtime",
            }
            record.update({new: logs[old] for old, new in renames.items() if old in logs})
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return JsonlLog()


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss: stop, and save nothing as the best adapter."""


def non_finite_message(what: str, value, step: int, precision: str) -> str:
    hint = "lower --learning-rate, or train in bf16/fp32" if precision == "fp16" else "lower --learning-rate"
    return (
        f"training stopped: {what} is {value} at step {step}; nothing was saved as the adapter "
        f"(checkpoints written before step {step} are kept). Check the base model's weights (a model that "
        f"already outputs NaN cannot be trained), then {hint}."
    )


def make_trainer_class(precision: str):
    from transformers import Trainer, TrainerCallback

    class CheckedTrainer(Trainer):
        """Trainer that stops at the first non-finite training loss and reports a true mean loss after a resume.

        Without the check a NaN model trains to the end with exit code 0: the Trainer's nan filter logs the
        running mean instead (0.0 here), and eval_loss nan is then saved as the best. The check costs one
        device sync per micro-batch, nothing next to a forward and backward pass.

        After a resume at step N the Trainer's final train_loss leaves out steps 1..N (4.33 still divides by
        all steps: 5.09 logged for a true 7.65). Each checkpoint therefore also keeps the summed loss of its
        steps (loss_sum.json), and the final mean is that sum plus this process's, over all steps.
        """

        resumed_step = 0
        loss_sum_before = None  # summed loss of steps 1..resumed_step, if the checkpoint kept it
        true_train_loss = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # What training_step returned since this process started; the Trainer's own running sum sits in
            # private attributes that transformers 5 reshaped, this one is ours on both lanes.
            self.loss_sum_here = None
            self.add_callback(WriteLossSum(self))

        def loss_sum_now(self) -> float:
            """Summed loss of steps 1..now: the resumed checkpoint's plus this process's (mean over ranks)."""
            import torch

            here = self.loss_sum_here if self.loss_sum_here is not None else torch.zeros((), device=self.args.device)
            here = here.detach().clone().to(self.args.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(here)
                here /= torch.distributed.get_world_size()
            return (self.loss_sum_before or 0.0) + float(here.item())

        def log(self, logs, *args, **kwargs):
            # The final train_loss, from our own sums: transformers 4.33 divides the loss of this process's
            # steps by all steps (5.09 for a true 7.65 after a resume), 5.x by this process's steps only.
            steps = self.state.global_step
            if "train_loss" in logs and steps:
                if self.loss_sum_before is not None or not self.resumed_step:
                    logs["train_loss"] = self.loss_sum_now() / steps
                elif steps > self.resumed_step:  # the checkpoint predates loss_sum.json: the resumed steps' mean
                    logs["train_loss"] = self.loss_sum_now() / (steps - self.resumed_step)
                self.true_train_loss = logs["train_loss"]
            return super().log(logs, *args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            loss = super().training_step(model, inputs, *args, **kwargs)
            if not bool(loss.isfinite().all()):
                raise NonFiniteLoss(non_finite_message("the training loss", loss.item(), self.state.global_step + 1,
                                                       precision))
            step_loss = loss.detach()
            self.loss_sum_here = step_loss if self.loss_sum_here is None else self.loss_sum_here + step_loss
            return loss

    class WriteLossSum(TrainerCallback):
        """on_save runs on every rank right after a checkpoint is written: loss_sum.json goes into it."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_save(self, args, state, control, **kwargs):
            trainer = self.trainer
            known = trainer.loss_sum_before is not None or not trainer.resumed_step
            total = trainer.loss_sum_now() if known else None  # every rank joins the all_reduce
            if args.should_save and known:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    atomic_write_json(folder / LOSS_SUM_FILE, {"global_step": state.global_step, "loss_sum": total})

    class StopOnNonFiniteEval(TrainerCallback):
        """on_log runs after evaluate() and before the checkpoint (and best_metric) is saved."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = (logs or {}).get("eval_loss")
            if value is not None and not math.isfinite(value):
                raise NonFiniteLoss(non_finite_message("the eval loss", value, state.global_step, precision))

    return CheckedTrainer, StopOnNonFiniteEval


# --------------------------------------------------------------------------- main: setup -> fit -> save


def main(argv=None, callbacks: Sequence = ()) -> Path:
    """CLI entry: parse and check the config, hold the run's lock, train. callbacks: extra TrainerCallbacks
    (finetune.demo prints progress through one). Returns the saved adapter (or model) folder."""
    cfg = parse_config(TrainConfig, argv, __doc__)
    cfg.validate()
    rank = int(os.environ.get("RANK", 0))
    try:
        if rank != 0:  # rank 0 holds the run's lock for all of them
            return train(cfg, callbacks)
        check_writable(cfg.output_dir, need_bytes=64 << 20, what="--output-dir")
        with OutputLock(Path(cfg.output_dir) / "train", "finetune.train"):
            return train(cfg, callbacks)
    except (NonFiniteLoss, OutputError) as err:
        raise SystemExit(str(err)) from None
    except (dataset.DataError, LaneError) as err:
        raise SystemExit(f"error: {err}") from None


def train(cfg: TrainConfig, callbacks: Sequence = ()) -> Path:
    run = setup(cfg)
    trainer = fit(run, callbacks)
    return save(run, trainer)


@dataclass
class Run:
    """Everything `setup` prepared for one training run (this rank's view)."""

    cfg: TrainConfig
    rank: int
    world_size: int
    out: Path
    family: Family
    tokenizer: object
    model: object
    precision: str
    schema: dict
    dev_rows: list
    train_set: list
    dev_set: list
    eval_steps: int
    log_path: Path
    checkpoint_dir: Path
    resume_from: Path | None
    resumed_step: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        """Print on rank 0 only (every rank runs the same code)."""
        if self.is_main:
            print(message, flush=True)


def setup(cfg: TrainConfig) -> Run:
    """Data, tokenizer, model, schema and the resume point; writes train_config.json and schema.json (rank 0)."""
    import torch
    from transformers import set_seed

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    say = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    train_rows = dataset.load_split(cfg.data_dir, "train")
    negatives = D.negative_extraction_rows(train_rows, cfg.negative_rows)
    if negatives:
        say(f"added {len(negatives)} extraction rows answered [] from classification texts "
            f"(--negative-rows {cfg.negative_rows})")
    train_rows = train_rows + negatives
    dev_path = Path(cfg.data_dir) / dataset.DEV_FILE
    dev_rows = dataset.read_jsonl(dev_path) if dev_path.is_file() else []
    family = family_of_dir(cfg.base_model)
    tokenizer = load_tokenizer(cfg.base_model, family)
    precision = resolve_precision(cfg.precision)
    model = build_model(cfg, family, precision)
    trainable, total = count_parameters(model)

    schema = dataset.derive_schema(train_rows)
    schema["family"] = family.name
    schema["answer_tokens"] = D.answer_token_budget(train_rows, tokenizer)
    # Serving cuts prompts the way training did and never generates past the longest answer.
    schema["max_source_len"], schema["max_target_len"] = cfg.max_source_len, cfg.max_target_len
    train_set = D.tokenize_examples(train_rows, tokenizer, family, cfg.max_source_len, cfg.max_target_len)
    dev_set = D.tokenize_examples(dev_rows, tokenizer, family, cfg.max_source_len, cfg.max_target_len)
    total_steps, eval_steps = auto_eval_steps(cfg, len(train_set), world_size)
    cut = D.count_cut_answers(train_rows, tokenizer, cfg.max_target_len)
    if cut:
        say(f"warning: {cut} of {len(train_rows)} training answers are longer than --max-target-len "
            f"{cfg.max_target_len} tokens and are cut; raise it if memory allows")

    resolved = {
        **asdict(cfg),
        "base_model": str(Path(cfg.base_model).resolve()),
        "family": family.name,
        "precision": precision,
        "world_size": world_size,
        "trainable_params": trainable,
        "total_params": total,
        "n_train": len(train_set),
        "n_dev": len(dev_set),
        "total_steps": total_steps,
        "answers_cut": cut,
        "eval_steps": eval_steps,
        "torch": torch.__version__,
    }
    print(
        f"[rank {rank}/{world_size}] family={family.name} precision={precision} "
        f"trainable={trainable:,} / total={total:,} ({100 * trainable / total:.2f}%)",
        flush=True,
    )
    if rank == 0:
        say(json.dumps(resolved, indent=2, ensure_ascii=False))
        atomic_write_json(out / "train_config.json", resolved)
        atomic_write_json(out / "schema.json", schema)

    checkpoint_dir = out / "checkpoints"
    resume_from = last_checkpoint(checkpoint_dir, log=say) if cfg.resume else None
    # checkpoint_problem has read this file, so it parses.
    resumed_step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"] if resume_from else 0
    log_path = out / "train_log.jsonl"
    if rank == 0:
        if resume_from:
            say(f"resuming from {resume_from} (step {resumed_step})")
            trim_log(log_path, resumed_step)
        else:
            if cfg.resume:
                say(f"--resume: no checkpoint in {checkpoint_dir}, starting from scratch")
            log_path.unlink(missing_ok=True)
    return Run(cfg, rank, world_size, out, family, tokenizer, model, precision, schema, dev_rows, train_set,
               dev_set, eval_steps, log_path, checkpoint_dir, resume_from, resumed_step)


def training_arguments(run: Run):
    """transformers TrainingArguments for the run: schedule, evaluation and checkpoints, precision, devices."""
    import torch

    from core import compat

    cfg = run.cfg
    use_cuda = torch.cuda.is_available()
    has_dev = bool(run.dev_set)
    return compat.training_arguments(
        output_dir=str(run.checkpoint_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # log what the loss is; NaN stops training anyway (CheckedTrainer)
        evaluation_strategy="steps" if has_dev else "no",
        eval_steps=run.eval_steps,
        save_strategy="steps",
        save_steps=run.eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=has_dev,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_safetensors=True,
        group_by_length=cfg.group_by_length,
        fp16=run.precision == "fp16",
        bf16=run.precision == "bf16",
        use_cpu=not use_cuda,  # transformers 4.33 deprecates no_cuda for it
        ddp_backend=None if use_cuda else ("gloo" if run.world_size > 1 else None),
        ddp_find_unused_parameters=False if run.world_size > 1 else None,
        deepspeed=cfg.deepspeed,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=use_cuda,
        disable_tqdm=not sys.stderr.isatty(),
        log_level="warning",
    )


def fit(run: Run, callbacks: Sequence = ()):
    """Train (from the resume point if any); returns the Trainer, holding the best model when evaluating."""
    allow_numpy_rng_state_in_checkpoints()
    collator = D.PadToLongestCollator(
        pad_token_id=run.tokenizer.pad_token_id, with_attention_mask=run.family.attention_mask_in_training
    )
    sample_decode = make_sample_decode_callback(
        run.dev_rows, run.cfg.sample_decode, run.tokenizer, run.schema, run.family, run.log_path, run.precision
    )
    trainer_class, stop_on_non_finite_eval = make_trainer_class(run.precision)
    trainer = trainer_class(
        model=run.model,
        args=training_arguments(run),
        train_dataset=run.train_set,
        eval_dataset=run.dev_set or None,
        data_collator=collator,
        # The log callback first, so train_log.jsonl shows the non-finite eval loss that stopped the run.
        callbacks=[make_log_callback(run.log_path), stop_on_non_finite_eval()]
        + ([sample_decode] if sample_decode else []) + list(callbacks),
    )
    if run.resume_from:
        trainer.resumed_step = run.resumed_step
        trainer.loss_sum_before = loss_sum_at(run.resume_from)
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    mean_loss = trainer.true_train_loss if trainer.true_train_loss is not None else result.training_loss
    print(
        f"[rank {run.rank}/{run.world_size}] finished at step {trainer.state.global_step}, "
        f"mean train loss {mean_loss:.4f}",
        flush=True,
    )
    return trainer


def save(run: Run, trainer) -> Path:
    """The trained adapter (or model) with its tokenizer and schema, renamed into place; returns its folder."""
    import torch

    final_dir = run.out / ("adapter" if run.cfg.method == "lora" else "model")
    # Saved beside and renamed into place (safe_io): a kill never leaves a half-written adapter for merge.
    # One name for every rank (the pid differs), safe because the run's lock admits one run.
    tmp = side_dir(final_dir, TMP_MARK, "save")
    if run.is_main:
        recover_dir(final_dir)
    try:
        trainer.save_model(str(tmp))  # the best checkpoint when evaluating (load_best_model_at_end)
        if run.is_main:
            run.tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / "schema.json", run.schema)
            replace_dir(tmp, final_dir, side_dir(final_dir, OLD_MARK, "save"))
    finally:
        if run.is_main:  # a failed save (a full disk) leaves no half-written folder; the old adapter is untouched
            shutil.rmtree(tmp, ignore_errors=True)
    best = trainer.state.best_metric
    run.say(f"saved {final_dir}" + (f" (best eval_loss {best:.4f} at {trainer.state.best_model_checkpoint})"
                                     if best else ""))
    # Ranks other than 0 used to leave while rank 0 was still saving; when one of them then died in its
    # interpreter teardown (below), torchrun killed rank 0 before the adapter was on disk. Leave together.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return final_dir


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Under torchrun on CPU (gloo, torch 2.13) about 1 run in 7 aborted in interpreter teardown after
        # everything was saved ("terminate called without an active exception"), and torchrun then reports
        # the whole run failed. destroy_process_group() instead hung about 1 run in 7. Everything is written
        # and every rank has passed the barrier in train(): leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
