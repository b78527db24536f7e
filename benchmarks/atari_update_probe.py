"""What one PPO update of ppo_atari.py costs on this CPU, per kernel setting: the update dominates Atari on CPU.

One update = the default 1,024-step batch (8 envs x 128 steps), 4 epochs x 4 minibatches of 256, through the
script's own Agent and update_policy, on random uint8 frames (convolution cost does not depend on pixel
values). Each configuration runs in a fresh process: one warm-up update, then the median of --repeat timed
updates. Configurations vary
- the layout: channels-last (the script's default) or the reference's NCHW (--no-channels-last);
- torch threads: 1 or 2;
- precision: float32, or bfloat16 autocast (--bf16);
- torch.compile of the agent (compile seconds reported apart);
- the instruction set: "native" (what the CPU has), or "avx2", which caps oneDNN, MKL and torch's own
  kernels at AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY): the float32 and
  bfloat16 speed of a CPU without AVX-512, AMX or native bfloat16, measured on this one.

    python benchmarks/atari_update_probe.py --out benchmarks/results/atari_update_probe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_reference import AVX2_ONLY, machine  # noqa: E402

CHILD = """
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import ppo_atari as ppo
threads, channels_last, bf16, compile_agent, repeat = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5] == "1", int(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(1)
args = ppo.Args(channels_last=channels_last, bf16=bf16)
T, N = args.num_steps, args.num_envs
agent = ppo.Agent(4, channels_last, bf16)
optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
obs = torch.randint(0, 256, (T, N, 4, 84, 84), dtype=torch.uint8)
with torch.no_grad():
    actions, logprobs, _, values = agent.get_action_and_value(obs.reshape(T * N, 4, 84, 84))
rollout = ppo.Rollout(
    obs, actions.reshape(T, N), logprobs.reshape(T, N), values.reshape(T, N), torch.randn(T, N),
    values.reshape(T, N), torch.zeros(T, N), torch.zeros(T, N),
)
advantages, returns = torch.randn(T, N), values.reshape(T, N) + torch.randn(T, N)
compile_seconds = 0.0
if compile_agent:
    start = time.perf_counter()
    agent.compile()
    ppo.update_policy(agent, optimizer, rollout, advantages, returns, args)
    compile_seconds = time.perf_counter() - start
ppo.update_policy(agent, optimizer, rollout, advantages, returns, args)  # warm-up
seconds = []
for _ in range(repeat):
    start = time.perf_counter()
    ppo.update_policy(agent, optimizer, rollout, advantages, returns, args)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"update_s": statistics.median(seconds), "compile_s": compile_seconds}))
"""

# name: (instruction set, threads, channels_last, bf16, compile)
CONFIGS = {
    "channels-last float32, 2 threads": ("native", 2, True, False, False),
    "channels-last float32, 1 thread": ("native", 1, True, False, False),
    "NCHW float32, 2 threads": ("native", 2, False, False, False),
    "channels-last bfloat16, 2 threads": ("native", 2, True, True, False),
    "channels-last float32 + torch.compile, 2 threads": ("native", 2, True, False, True),
    "AVX2 only: channels-last float32, 2 threads": ("avx2", 2, True, False, False),
    "AVX2 only: NCHW float32, 2 threads": ("avx2", 2, False, False, False),
    "AVX2 only: channels-last bfloat16, 2 threads": ("avx2", 2, True, True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script-dir", default=str(REPO), help="the folder that holds the ppo_atari.py to time")
    parser.add_argument("--repeat", type=int, default=3, help="timed updates per configuration (median)")
    parser.add_argument("--only", nargs="*", help="run only configurations whose name contains one of these")
    parser.add_argument("--out", help="folder for results.json and results.md")
    options = parser.parse_args()

    results = {"machine": machine(), "load_before": os.getloadavg()[0], "configs": {}}
    for name, (isa, threads, channels_last, bf16, compile_agent) in CONFIGS.items():
        if options.only and not any(part in name for part in options.only):
            continue
        env = {**os.environ, **(AVX2_ONLY if isa == "avx2" else {})}
        flags = [str(threads), str(int(channels_last)), str(int(bf16)), str(int(compile_agent)), str(options.repeat)]
        child = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", CHILD, options.script_dir, *flags],
            env=env,
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            sys.exit(f"{name} failed:\n{child.stderr[-2000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results["configs"][name] = result
        compiled = f" (compile {result['compile_s']:.0f} s)" if compile_agent else ""
        print(f"{name:52s} {result['update_s']:.2f} s per update{compiled}", flush=True)
    results["load_after"] = os.getloadavg()[0]
    print(
        "machine:",
        results["machine"],
        f"load average before {results['load_before']:.2f}, after {results['load_after']:.2f}",
    )
    if options.out:
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        rows = [f"| {name} | {r['update_s']:.2f} |" for name, r in results["configs"].items()]
        table = "| configuration | seconds per update (1,024 steps, 4 x 4 minibatches) |\n|---|---|\n" + "\n".join(rows)
        (out / "results.md").write_text(f"{table}\n\nmachine: {results['machine']}\n")


if __name__ == "__main__":
    main()
