"""Plan + apply LoRA on every linear layer of a Llama-2-7B-shaped model on the meta device, vs PEFT.

    ours:  surgery.planner.build_plan(surgery.parse("*: lora(r=16)"), model) + surgery.apply.apply_plan
    PEFT:  get_peft_model(model, LoraConfig(r=16, target_modules=[q,k,v,o,gate,up,down]),
                          low_cpu_mem_usage=True)

Both attach the same 224 adapters (7 per layer × 32 layers; ``*`` never includes ``lm_head``) to a
fresh meta model, so no weight is read or allocated. Only the surgery is timed: the meta models
are built outside the timed region. The two are alternated, after one untimed warm-up each (the
first call pays for lazy imports and grammar loading; its time is printed separately). The ratio is
of the minima, since load from other processes only adds time; the medians are printed too.

    python benchmarks/bench_plan_meta.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
import transformers
from peft import LoraConfig, get_peft_model

import surgery
from surgery.apply import apply_plan
from surgery.layers import SurgeryLinear
from surgery.planner import build_plan

SPEC = "*: lora(r=16)"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 0.5

CONFIG = transformers.LlamaConfig(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008, vocab_size=32000,
)


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(CONFIG)


def ours(model: torch.nn.Module) -> int:
    plan = build_plan(surgery.parse(SPEC), model)
    apply_plan(plan, model)
    return len(plan.linear)


def peft(model: torch.nn.Module) -> int:
    wrapped = get_peft_model(model, LoraConfig(r=16, target_modules=TARGETS), low_cpu_mem_usage=True)
    return sum(1 for _, m in wrapped.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


def timed(fn) -> tuple[float, torch.nn.Module, int]:
    """Seconds `fn` takes on a fresh meta model (built before the clock starts)."""
    model = meta_model()
    gc.collect()
    start = time.perf_counter()
    adapted = fn(model)
    return time.perf_counter() - start, model, adapted


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (after one warm-up)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    cold_ours, model_ours, n_ours = timed(ours)
    cold_peft, model_peft, n_peft = timed(peft)
    # Same work on both sides: as many adapted layers and as many trainable parameters.
    layers_ours = sum(isinstance(m, SurgeryLinear) for m in model_ours.modules())
    if not (n_ours == layers_ours == n_peft == 224) or trainable(model_ours) != trainable(model_peft):
        raise SystemExit(f"not the same surgery: ours adapted {layers_ours} layers ({trainable(model_ours)} "
                         f"trainable), PEFT {n_peft} ({trainable(model_peft)} trainable)")
    lora_params = trainable(model_ours)
    del model_ours, model_peft

    times = {"ours": [], "peft": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(ours)[0])
        times["peft"].append(timed(peft)[0])

    print(f"Llama-2-7B shape on meta: {n_ours} adapted layers, {lora_params:,} LoRA parameters on each side")
    print(f"cold (first call):  ours {cold_ours * 1e3:8.1f} ms   peft {cold_peft * 1e3:8.1f} ms")
    for name, values in times.items():
        print(f"{name:5s} x{len(values)}:  median {statistics.median(values) * 1e3:8.1f} ms   "
              f"min {min(values) * 1e3:8.1f} ms")
    # The headline is the ratio of minima: load from other processes only ever adds time.
    ratio = min(times["ours"]) / min(times["peft"])
    median = statistics.median(times["ours"]) / statistics.median(times["peft"])
    print(f"ratio of medians {median:.2f}, cold ratio {cold_ours / cold_peft:.2f}")
    print(f"RATIO plan_meta ours/peft = {ratio:.2f} (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
