"""The `worldflow` command line: the one file that may reach the library, envs and agents.

Each subcommand imports what it needs inside its handler, so `worldflow --help` stays fast.
"""

import argparse
import signal
import sys
import threading

from . import __version__

# kept in step with pretrained.EMBEDDED_WORLDS (not imported: `worldflow --help` stays free of torch)
WORLD_HELP = "run or checkpoint dir, or an embedded world: 'default', 'fast' or 'takecover' (default: 'default')"
class DEFAULTS(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says what the default means."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if "default" not in text and action.option_strings and shown:
            text += f" (default: {action.default})"
        return text
DEVICE_HELP = "where the model runs: auto (CUDA when present), cpu, cuda or cuda:N"


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def make_policy(name: str | None, num_actions: int, seed: int | None, frame_size: int = 64):
    """'random', 'tracker' or 'tracker-offset' (the scripted Breakout policies), a saved agent's directory,
    or None -> a callable obs -> action (or None).

    An agent must act with `num_actions` actions on frame_size x frame_size frames, else a ValueError.
    """
    if name is None:
        return None
    from .agents import AgentPolicy
    from .agents.evaluate import random_policy
    from .agents.scripted import TRACKERS

    if name == "random":
        return random_policy(num_actions, seed)
    if name in TRACKERS:
        if frame_size != 64:
            raise ValueError(f"the Breakout tracker reads 64x64 frames; this needs {frame_size}x{frame_size}")
        return TRACKERS[name](seed, num_actions=num_actions)

    policy = AgentPolicy(name, seed)
    spec = policy.net.spec
    if (spec.num_actions, spec.frame_size) != (num_actions, frame_size):
        raise ValueError(f"agent {name} acts with {spec.num_actions} actions on {spec.frame_size}px frames; "
                         f"this needs {num_actions} actions on {frame_size}px frames")
    return policy


def parse_env_args(pairs: list[str]) -> dict:
    """["frame_skip=4", ...] -> {"frame_skip": 4}: gym.make keywords, each value read as YAML (numbers,
    booleans and strings, as a manifest records them)."""
    import yaml

    kwargs = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--env-arg takes KEY=VALUE with KEY a keyword of gym.make, got {pair!r}")
        value = yaml.safe_load(text)
        if not isinstance(value, (int, float, str, bool)):
            raise ValueError(f"--env-arg {key}: the value must be a number, a boolean or a string, got {text!r}")
        kwargs[key] = value
    return kwargs


def run_collect(args) -> None:
    from pathlib import Path

    from .collect import collect

    factory, name, env_kwargs = None, args.policy, parse_env_args(args.env_arg)
    if args.policy == "held-random":
        import functools

        from .collect import HeldRandom, make_env

        env = make_env(args.env, args.obs_key, **env_kwargs)
        factory = functools.partial(HeldRandom, num_actions=int(env.action_space.n), max_hold=args.max_hold)
        factory(0)  # a bad --max-hold fails here, not in a worker
        env.close()
        name = f"held-random (1..{args.max_hold} steps)"
    elif args.policy != "random":  # rebuilt inside each worker, once per episode, from its seed
        import functools

        from .agents import AgentPolicy
        from .agents.scripted import TRACKERS
        from .collect import make_env

        if args.policy not in TRACKERS:
            name = str(Path(args.policy).resolve())
        elif "Breakout" not in args.env:
            raise ValueError(f"--policy {args.policy} plays Breakout only, not {args.env}")
        env = make_env(args.env, args.obs_key, **env_kwargs)
        make_policy(name, env.action_space.n, None, args.size)  # a bad policy fails here, not in a worker
        env.close()
        factory = TRACKERS[name] if name in TRACKERS else functools.partial(AgentPolicy, name)
    manifest = collect(args.env, args.steps, args.out, size=args.size, seed=args.seed, workers=args.workers,
                       ray_address=args.ray_address, policy_factory=factory, policy_name=name, obs_key=args.obs_key,
                       env_kwargs=env_kwargs)
    print(f"{args.out}: {args.env}, {manifest['num_actions']} actions {manifest['action_meanings']}, "
          f"events {manifest['event_names']}")


def run_train(args) -> None:
    from .config import load_config
    from .train import train

    if args.ray_workers < 0:
        raise ValueError(f"--ray-workers must be 0 (this process) or more, got {args.ray_workers}")
    cfg = load_config(args.config)
    if args.init:
        cfg.train.init = args.init
    checkpoint = train(cfg, args.data, args.out, ray_workers=args.ray_workers, ray_address=args.ray_address,
                       device=args.device)
    print(f"checkpoint: {checkpoint}")


def run_dream(args) -> None:
    import gymnasium as gym
    from tqdm import tqdm

    from .devices import pick_device
    from .envs.video import write_video

    env = gym.make("WorldFlow-v0", checkpoint=args.checkpoint, sampler=args.sampler, denoiser=args.denoiser,
                   max_episode_steps=args.steps, device=pick_device(args.device))
    policy = make_policy(args.policy, env.action_space.n, args.seed, env.observation_space.shape[0])
    obs, _ = env.reset(seed=args.seed)
    frames, total, episodes, done = [obs], 0.0, 1, False
    for _ in tqdm(range(args.steps), desc="dream", unit="frame"):
        if done:  # the dreamed episode ended: the next frame starts a new one from a real context
            (obs, _), episodes = env.reset(), episodes + 1
            if hasattr(policy, "reset"):
                policy.reset()
        else:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += reward
            done = terminated or truncated
        frames.append(obs)
    write_video(frames, args.out, fps=env.metadata["render_fps"])
    print(f"{args.out}: {len(frames)} frames, {episodes} episode(s), predicted return {total:+.0f}")


def run_eval(args) -> None:
    import json
    from pathlib import Path

    from .collect import collect, write_json_atomic
    from .devices import pick_device
    from .evaluate import FRESH_SEED_OFFSET, evaluate
    from .pretrained import load_world, resolve_world
    from .report import plot_psnr, plot_strip, table

    model = load_world(args.checkpoint, pick_device(args.device))[0]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)  # the plots (and fresh data) go beside the JSON
    data, split = args.data, "val"
    if data is None:  # fresh episodes of the world's own real game: all of them are held out
        data, split = out.with_name(f"{out.stem}_data"), "all"
        collect(model.config.env_id, args.collect_steps, str(data), size=model.config.frame_size,
                seed=FRESH_SEED_OFFSET + args.seed, obs_key=model.config.obs_key, env_kwargs=model.config.env_kwargs)
    result, strip = evaluate(model, data, split, args.horizon, args.clips, args.seed, args.temperature,
                             args.sampler, args.windows)
    plots = dict(psnr_plot=out.with_name(f"{out.stem}_psnr.png"), strip=out.with_name(f"{out.stem}_strip.png"))
    plot_psnr(result, plots["psnr_plot"])
    plot_strip(strip, plots["strip"])
    result.update(checkpoint=str(resolve_world(args.checkpoint)), data=str(data), **{k: str(v) for k, v in plots.items()})
    write_json_atomic(out, result)
    print(table(result))
    print(json.dumps(result))


def run_play(args) -> None:
    import gymnasium as gym

    from .devices import pick_device
    from .envs.play import Player

    env = gym.make("WorldFlow-v0", checkpoint=args.checkpoint, sampler=args.sampler, denoiser=args.denoiser,
                   max_episode_steps=args.episode_steps, device=pick_device(args.device))
    n, size = env.action_space.n, env.observation_space.shape[0]
    player = Player(env, scale=args.scale, fps=args.fps, autoplay=make_policy(args.autoplay, n, args.seed, size),
                    agent=make_policy(args.agent, n, args.seed, size), compare=args.compare, record=args.record,
                    screenshot=args.screenshot, seed=args.seed)
    summary = player.run(args.max_steps)
    print(f"played {summary['steps']} steps in {summary['seconds']:.1f} s: {summary['fps']:.1f} frames/s"
          + (f"; recorded {summary['record']}" if summary["record"] else ""))


def run_agent_train(args) -> None:
    from .agents import AgentConfig, train_agent
    from .devices import pick_device

    if args.workers < 0:
        raise ValueError(f"--workers must be 0 (in this process) or more, got {args.workers}")
    if not 0 <= args.gpus_per_worker <= 1:
        raise ValueError(f"--gpus-per-worker is a fraction of one GPU in [0, 1], got {args.gpus_per_worker}")
    chosen = {k: v for k, v in dict(event_penalty=args.event_penalty, event_cost=args.event_cost,
                                    entropy=args.entropy, lr=args.lr).items() if v is not None}
    cfg = AgentConfig(steps=args.steps, envs_per_worker=args.envs, horizon=args.horizon, seed=args.seed,
                      sample_termination=args.sample_termination, guidance=args.guidance, sampler=args.sampler,
                      observation=args.observation, starts=args.starts, start_count=args.start_count, **chosen)
    path = train_agent(cfg, args.out, args.checkpoint, args.workers, args.ray_address,
                       device=pick_device(args.device), gpus_per_worker=args.gpus_per_worker)
    print(f"agent: {path}")


def run_agent_eval(args) -> None:
    import json

    from .agents.evaluate import evaluate_agent
    from .collect import write_json_atomic
    from .devices import pick_device

    result = evaluate_agent(args.agent, args.env, args.episodes, args.seed, args.max_steps,
                            selection_episodes=args.selection_episodes, device=pick_device(args.device))
    for name in ("agent", "random", "periodic"):
        if name not in result:
            continue
        r = result[name]
        actions = " ".join(f"{a} {f:.0%}" for a, f in r["action_fractions"].items())
        chosen = f" [{result['periodic_selection']['chosen']}]" if name == "periodic" else ""
        print(f"{name:>8}{chosen} in {result['env_id']}: {r['mean']:.2f} ± {r['stderr']:.2f} over {r['episodes']} "
              f"episodes (actions: {actions})")
    if args.json:
        from pathlib import Path

        write_json_atomic(Path(args.json), result)
        print(f"wrote {args.json}")
    else:
        print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldflow", description="WorldFlow: a learned simulator "
                                     "built on autoregressive normalizing flows.",
                                     formatter_class=DEFAULTS)
    parser.add_argument("--version", action="version", version=f"worldflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("collect",
        formatter_class=DEFAULTS, help="record real episodes into atomic shards (resumes if OUT exists)")
    p.add_argument("--env", required=True, help="Gymnasium pixel env id, e.g. ALE/Breakout-v5")
    p.add_argument("--steps", type=int, required=True, help="environment steps in total")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: in this process)")
    p.add_argument("--policy", default="random", help="behaviour policy: 'random', 'held-random' (a random action "
                   "held for 1..--max-hold steps), 'tracker' (scripted Breakout "
                   "paddle that follows the ball, 25%% random actions), 'tracker-offset' (the same aiming up to 8 "
                   "columns off, so it misses about half the balls) or an agent directory")
    p.add_argument("--max-hold", type=int, default=30, help="longest hold of --policy held-random, in steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=64, help="frames are resized to SIZE x SIZE RGB")
    p.add_argument("--obs-key", default=None, help="the RGB image entry of Dict observations (default: the only one)")
    p.add_argument("--env-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword for gym.make, e.g. frame_skip=4 (repeatable); the world trained on the data "
                   "remembers it, and its real game is made the same way")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    p.set_defaults(handler=run_collect)

    p = sub.add_parser("train",
        formatter_class=DEFAULTS, help="train a world model (resumes if OUT exists)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/breakout.yaml")
    p.add_argument("--data", required=True, nargs="+", help="dataset directory from `worldflow collect`; "
                   "several (one game, e.g. random and tracker play) are pooled clip by clip")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init", default="", help="fine-tune: start from this checkpoint's weights (the config's "
                   "train.init); with train.ae_steps 0 its autoencoder is kept")
    p.add_argument("--ray-workers", type=int, default=0, help="data-parallel Ray Train workers "
                   "(DDP over gloo; 0: train in this process, Ray is not started)")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    add_device(p)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("eval",
        formatter_class=DEFAULTS, help="measure a world on real held-out episodes: bits/dim, open-loop PSNR/SSIM, heads")
    p.add_argument("checkpoint", nargs="?", default=None, help=WORLD_HELP)
    p.add_argument("--data", default=None, help="dataset dir (its held-out episodes are used); default: "
                   "collect fresh episodes of the world's own game next to --json")
    p.add_argument("--horizon", type=int, default=16, help="open-loop dream steps compared with the real ones")
    p.add_argument("--clips", type=int, default=32, help="real clips dreamed from, as one batch")
    p.add_argument("--windows", type=int, default=256, help="real windows scored for bits/dim and the heads")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the sampling noise")
    p.add_argument("--sampler", choices=["jacobi", "sequential"], default="jacobi", help="flow inversion")
    p.add_argument("--collect-steps", type=int, default=5000, help="real steps collected when --data is not given")
    p.add_argument("--json", default="eval.json", help="result file; the plots are written beside it")
    add_device(p)
    p.set_defaults(handler=run_eval)

    p = sub.add_parser("play",
        formatter_class=DEFAULTS, help="play a world in a pygame window (H in the window lists the keys)")
    p.add_argument("checkpoint", nargs="?", default=None, help=WORLD_HELP)
    p.add_argument("--scale", type=int, default=8, help="pixels per frame pixel (nearest neighbour)")
    p.add_argument("--fps", type=int, default=None, help="target frames/s (default: the env's render_fps; 0: uncapped)")
    p.add_argument("--compare", action="store_true", help="show the real game beside the dream, same keys")
    p.add_argument("--autoplay", default=None, help="'random' or an agent directory: it plays instead of the keys")
    p.add_argument("--agent", default=None, help="an agent directory; M hands control between you and it")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    p.add_argument("--episode-steps", type=int, default=10_000, help="a dreamed episode is truncated after N steps")
    p.add_argument("--record", default=None, help="record what is shown to clip.mp4")
    p.add_argument("--screenshot", default=None, help="save the last frame shown to a PNG on exit")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: none, a fresh one)")
    p.add_argument("--sampler", choices=["jacobi", "sequential"], default="jacobi", help="flow inversion")
    p.add_argument("--denoiser", choices=["flow-score", "tweedie", "none"], default="flow-score",
                   help="how a dreamed frame's noise is removed")
    add_device(p)
    p.set_defaults(handler=run_play)

    p = sub.add_parser("dream",
        formatter_class=DEFAULTS, help="roll out the world model under a policy and write mp4/gif")
    p.add_argument("checkpoint", nargs="?", default=None, help=WORLD_HELP)
    p.add_argument("--steps", type=int, default=200, help="frames after the first (ended episodes restart)")
    p.add_argument("--out", required=True, help="clip.mp4 or clip.gif")
    p.add_argument("--policy", default="random", help="'random', 'tracker' or 'tracker-offset' (scripted Breakout) "
                   "or an agent directory (`worldflow agent train`)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--sampler", choices=["jacobi", "sequential"], default="jacobi", help="flow inversion")
    p.add_argument("--denoiser", choices=["flow-score", "tweedie", "none"], default="flow-score",
                   help="how a dreamed frame's noise is removed")
    add_device(p)
    p.set_defaults(handler=run_dream)

    agent = sub.add_parser("agent",
        formatter_class=DEFAULTS, help="RL agents trained inside a world, checked in the real game")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)
    p = agent_sub.add_parser("train",
        formatter_class=DEFAULTS, help="train an actor-critic in the dream (resumes if OUT exists)")
    p.add_argument("--checkpoint", default=None, help="world: " + WORLD_HELP)
    p.add_argument("--workers", type=int, default=0, help="Ray rollout actors (0: roll out in this process)")
    p.add_argument("--steps", type=int, required=True, help="imagined environment steps in total")
    p.add_argument("--envs", type=int, default=16, help="dreams batched in each worker's vector env")
    p.add_argument("--horizon", type=int, default=15, help="imagined episodes are truncated after this many steps")
    p.add_argument("--sampler", choices=["jacobi", "sequential"], default="jacobi",
                   help="flow inversion in the dreams (the same frames; sequential is faster on small CPUs)")
    p.add_argument("--observation", choices=["frames", "latent"], default="frames",
                   help="what the agent sees: a stack of frames, or the world's own state at each frame "
                   "(its hidden state and latents; the world computes them from real frames in the real game)")
    p.add_argument("--starts", nargs="+", default=None, metavar="DATA",
                   help="datasets of the world's game: dreams start from real clips spread over their training "
                   "episodes (default: the world's few shipped start contexts)")
    p.add_argument("--start-count", type=int, default=1024, help="how many real clips --starts draws")
    p.add_argument("--event-penalty", type=float, default=None,
                   help="weight of the world's event risk (a life lost, damage) as a shaping potential "
                   "(default: AgentConfig's, 0: the game's rewards alone)")
    p.add_argument("--event-cost", type=float, default=None,
                   help="cost per imagined step of the world's event risk (default: AgentConfig's, 0: none)")
    p.add_argument("--sample-termination", action="store_true",
                   help="imagined episodes end with the termination head's probability, not above 0.5")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight over actions in the dreams (default: off)")
    p.add_argument("--entropy", type=float, default=None,
                   help="weight of the policy's entropy bonus (default: AgentConfig's, 0.001 as DIAMOND's)")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: AgentConfig's, 3e-4)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="agent run directory")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPU fraction each Ray rollout actor takes")
    add_device(p)
    p.set_defaults(handler=run_agent_train)
    p = agent_sub.add_parser("eval",
        formatter_class=DEFAULTS, help="play the REAL game: mean return ± s.e., beside a random policy and "
                             "the best state-blind periodic one")
    p.add_argument("--agent", required=True, help="agent run directory (or its latest/)")
    p.add_argument("--env", default=None, help="real env id (default: the game of the agent's world)")
    p.add_argument("--episodes", type=int, default=20, help="real episodes per policy")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--max-steps", type=int, default=10_000, help="cap on one episode's steps")
    p.add_argument("--selection-episodes", type=int, default=5, help="episodes per candidate when choosing the "
                   "periodic baseline on other seeds (0: no periodic baseline)")
    p.add_argument("--json", default=None, help="write the result here (default: print it)")
    add_device(p)
    p.set_defaults(handler=run_agent_eval)
    return parser


def stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # `kill`, a batch scheduler or a container stop sends SIGTERM, and a job started with `&` ignores
    # Ctrl-C's SIGINT: both then get Ctrl-C's clean stop (save, then exit) instead of dying mid-step.
    # Only the main thread may set handlers; the caller's handler comes back when the command ends.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_like_ctrl_c) if in_main_thread else None
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, not where in torch
        print(f"worldflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worldflow {args.command}: interrupted; what was written is complete, rerun to resume",
              file=sys.stderr)
        return 130
    finally:
        if in_main_thread:  # None: a handler set outside Python, which Python cannot put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
