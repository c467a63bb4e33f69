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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune import data as D
from finetune.config import parse_config
from finetune.families import Family, family_of_dir, load_model, load_tokenizer
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
    max_source_len: int = field(default=400, metadata={"help": "prompt tokens kept (cut in the middle)"})
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
        if not (base / "config.json").is_file():
            problems.append(f"--base-model {base}: no config.json there; give a local model directory")
        if not (Path(self.data_dir) / D.TRAIN_FILE).is_file():
            problems.append(f"--data-dir {self.data_dir}: no {D.TRAIN_FILE} (run `make data` or copy it there)")
        for name in ("batch_size", "grad_accum", "lora_r", "max_source_len", "max_target_len", "logging_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
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

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    # LoRA keeps the frozen base in half precision (fits a 6B model in 16 GB); a full fine-tune keeps
    # fp32 master weights and lets autocast do the half-precision math.
    load_dtype = dtypes[precision] if cfg.method == "lora" else torch.float32
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


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return Path(found) if checkpoint_dir.is_dir() and (found := get_last_checkpoint(str(checkpoint_dir))) else None


def trim_log(log_path: Path, keep_until_step: int) -> None:
    """On resume, drop log lines an interrupted run wrote after the checkpoint it resumes from."""
    if not log_path.is_file():
        return
    kept = [
        line
        for line in log_path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
    ]
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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
        """Trainer that stops at the first non-finite training loss.

        Without this a NaN model trains to the end with exit code 0: the Trainer's nan filter logs the
        running mean instead (0.0 here), and eval_loss nan is then saved as the best. The check costs one
        device sync per micro-batch, nothing next to a forward and backward pass.
        """

        def training_step(self, model, inputs):
            loss = super().training_step(model, inputs)
            if not bool(loss.isfinite().all()):
                raise NonFiniteLoss(non_finite_message("the training loss", loss.item(), self.state.global_step + 1,
                                                       precision))
            return loss

    class StopOnNonFiniteEval(TrainerCallback):
        """on_log runs after evaluate() and before the checkpoint (and best_metric) is saved."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = (logs or {}).get("eval_loss")
            if value is not None and not math.isfinite(value):
                raise NonFiniteLoss(non_finite_message("the eval loss", value, state.global_step, precision))

    return CheckedTrainer, StopOnNonFiniteEval


# --------------------------------------------------------------------------- main


def main(argv=None) -> Path:
    cfg = parse_config(TrainConfig, argv, __doc__)
    cfg.validate()
    try:
        return train(cfg)
    except NonFiniteLoss as err:
        raise SystemExit(str(err)) from None


def train(cfg: TrainConfig) -> Path:
    import torch
    from transformers import TrainingArguments, set_seed

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    is_main = rank == 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    train_rows = D.load_split(cfg.data_dir, "train")
    dev_path = Path(cfg.data_dir) / D.DEV_FILE
    dev_rows = D.read_jsonl(dev_path) if dev_path.is_file() else []
    family = family_of_dir(cfg.base_model)
    tokenizer = load_tokenizer(cfg.base_model, family)
    precision = resolve_precision(cfg.precision)
    model = build_model(cfg, family, precision)
    trainable, total = count_parameters(model)

    schema = D.derive_schema(train_rows)
    schema["family"] = family.name
    schema["answer_tokens"] = D.answer_token_budget(train_rows, tokenizer)
    # Serving cuts prompts the way training did and never generates past the longest answer.
    schema["max_source_len"], schema["max_target_len"] = cfg.max_source_len, cfg.max_target_len
    train_set = D.tokenize_examples(train_rows, tokenizer, family, cfg.max_source_len, cfg.max_target_len)
    dev_set = D.tokenize_examples(dev_rows, tokenizer, family, cfg.max_source_len, cfg.max_target_len)
    total_steps, eval_steps = auto_eval_steps(cfg, len(train_set), world_size)
    cut = D.count_cut_answers(train_rows, tokenizer, cfg.max_target_len)
    if cut and is_main:
        print(
            f"warning: {cut} of {len(train_rows)} training answers are longer than --max-target-len "
            f"{cfg.max_target_len} tokens and are cut; raise it if memory allows",
            flush=True,
        )

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
    if is_main:
        print(json.dumps(resolved, indent=2, ensure_ascii=False), flush=True)
        (out / "train_config.json").write_text(json.dumps(resolved, indent=2, ensure_ascii=False), encoding="utf-8")
        (out / "schema.json").write_text(json.dumps(schema, indent=2, ensure_ascii=False), encoding="utf-8")

    checkpoint_dir = out / "checkpoints"
    resume_from = last_checkpoint(checkpoint_dir) if cfg.resume else None
    allow_numpy_rng_state_in_checkpoints()
    log_path = out / "train_log.jsonl"
    if is_main:
        if resume_from:
            step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"]
            print(f"resuming from {resume_from} (step {step})", flush=True)
            trim_log(log_path, step)
        else:
            if cfg.resume:
                print(f"--resume: no checkpoint in {checkpoint_dir}, starting from scratch", flush=True)
            log_path.unlink(missing_ok=True)

    use_cuda = torch.cuda.is_available()
    has_dev = bool(dev_set)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
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
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=has_dev,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        save_safetensors=True,
        group_by_length=cfg.group_by_length,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not use_cuda,  # transformers 4.33 deprecates no_cuda for it
        ddp_backend=None if use_cuda else ("gloo" if world_size > 1 else None),
        ddp_find_unused_parameters=False if world_size > 1 else None,
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
    collator = D.PadToLongestCollator(
        pad_token_id=tokenizer.pad_token_id, with_attention_mask=family.attention_mask_in_training
    )
    sample_decode = make_sample_decode_callback(
        dev_rows, cfg.sample_decode, tokenizer, schema, family, log_path, precision
    )
    trainer_class, stop_on_non_finite_eval = make_trainer_class(precision)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=dev_set or None,
        data_collator=collator,
        # The log callback first, so train_log.jsonl shows the non-finite eval loss that stopped the run.
        callbacks=[make_log_callback(log_path), stop_on_non_finite_eval()] + ([sample_decode] if sample_decode else []),
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    print(
        f"[rank {rank}/{world_size}] finished at step {trainer.state.global_step}, "
        f"mean train loss {result.training_loss:.4f}",
        flush=True,
    )

    final_dir = out / ("adapter" if cfg.method == "lora" else "model")
    trainer.save_model(str(final_dir))  # the best checkpoint when evaluating (load_best_model_at_end)
    if is_main:
        tokenizer.save_pretrained(str(final_dir))
        (final_dir / "schema.json").write_text(json.dumps(schema, indent=2, ensure_ascii=False), encoding="utf-8")
        best = trainer.state.best_metric
        print(
            f"saved {final_dir}"
            + (f" (best eval_loss {best:.4f} at {trainer.state.best_model_checkpoint})" if best else "")
        )
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
