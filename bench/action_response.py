"""Does the dream answer an action as the game does? Each action held from the same real states, in both.

    python bench/action_response.py [--checkpoint takecover] [--starts 32] [--hold 10] [--guidance W] [--temperature T]

Each start is a real episode (a fresh seed) played context_frames to --prefix random steps; from there every action
is held for --hold steps, in the real game (the episode replayed from its seed, which ViZDoom and ALE
repeat exactly) and in the dream (started from the last context_frames real frames, the same noise for
every action). Printed per action: how far its last frame lies from each other action's (mean absolute
difference, grey levels per pixel: how much the choice of action shows), and how often each world
event happened within the hold in the real game beside the dream's mean predicted risk for it, and, start
by start, how often the risk picks out the action the game spared (`ranking_agreement`). A dream that can
teach moves as far as the game does and ranks the actions' risks as the game does, state by state.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from worldflow.collect import make_env, resize_frames, write_json_atomic
from worldflow.pretrained import load_world

FRESH_SEED = 3_000_000  # episodes no collection or other bench used


def real_branches(env_id, obs_key, env_kwargs: dict, seed: int, prefix: np.ndarray, n_actions: int, hold: int,
                  size: int):
    """Replay `prefix` from `seed`, then hold each action: the prefix frames (P+1, S, S, 3), each action's
    frames over the hold (A, hold, S, S, 3; the last one repeated if the episode ended) and whether each
    game variable dropped during its hold (A, V); None if the episode ended within the prefix."""
    env = make_env(env_id, obs_key, **env_kwargs)
    try:
        holds, drops = [], []
        for action in [None, *range(n_actions)]:
            obs, info = env.reset(seed=seed)
            frames = [resize_frames(obs, size)]
            for a in prefix:
                obs, _, terminated, truncated, info = env.step(int(a))
                frames.append(resize_frames(obs, size))
                if terminated or truncated:
                    return None
            if action is None:
                context = np.stack(frames)
                continue
            if not np.array_equal(frames[-1], context[-1]):
                raise RuntimeError(f"{env_id} does not replay a seeded episode exactly: no common start to branch from")
            before = info.get("game_variables", np.zeros(0))
            dropped, seen = np.zeros(before.shape, bool), []
            for _ in range(hold):
                obs, _, terminated, truncated, info = env.step(action)
                now = info.get("game_variables", before)
                dropped |= now < before
                before = now
                seen.append(resize_frames(obs, size))
                if terminated or truncated:
                    break
            holds.append(np.stack(seen + seen[-1:] * (hold - len(seen))))
            drops.append(dropped)
        return context, np.stack(holds), np.stack(drops)
    finally:
        env.close()


def real_head_risk(model, contexts: np.ndarray, context_actions: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """The event heads read on the real game's own frames over each hold: contexts (N, K, S, S, 3), the K-1
    actions between them (N, K-1), holds (N, A, H, S, S, 3) -> the risk at each step of the hold (N, A, H, E). Beside the
    dream's risk it tells the heads' judgement apart from the dream's drawing."""
    N, A, H = holds.shape[:3]
    K = contexts.shape[1]
    frames = np.concatenate([np.repeat(contexts[:, None], A, 1), holds], axis=2).reshape(N * A, K + H, *holds.shape[3:])
    actions = np.concatenate([np.repeat(context_actions[:, None], A, 1),
                              np.broadcast_to(np.arange(A)[None, :, None], (N, A, H))], axis=2).reshape(N * A, -1)
    risks = [model.start(torch.from_numpy(frames[:, t + 1:t + 1 + K].copy()),
                         torch.from_numpy(actions[:, t + 1:t + K].copy()).long()).event_risk.numpy()
             for t in range(H)]  # the window ending at the hold's step t
    return np.stack(risks, 2).reshape(N, A, H, -1)


def mean_pairwise_difference(frames: np.ndarray) -> np.ndarray:
    """frames (N, A, S, S, 3) -> (A, A): mean |frame_a - frame_b| over starts and pixels, in grey levels."""
    A = frames.shape[1]
    out = np.zeros((A, A))
    for a, b in itertools.combinations(range(A), 2):
        out[a, b] = out[b, a] = np.abs(frames[:, a].astype(np.float64) - frames[:, b]).mean()
    return out


def ranking_agreement(outcome: np.ndarray, risk: np.ndarray) -> tuple[float, int]:
    """outcome (N, A) bool: the event happened in the real game over that action's hold; risk (N, A) the
    predicted risk. Over every start's pairs of actions whose real outcomes differ, the fraction where the
    risk is lower for the action that was spared (ties count half; 0.5 is a coin), and the number of such
    pairs. This asks what an agent needs: which action is safer here, not on average, so it is read beside
    a state-blind ranking (each action's mean risk at every start)."""
    right, pairs = 0.0, 0
    for a, b in itertools.combinations(range(outcome.shape[1]), 2):
        differ = outcome[:, a] != outcome[:, b]
        spared_a = ~outcome[differ, a]
        lower_a = risk[differ, a] < risk[differ, b]
        ties = risk[differ, a] == risk[differ, b]
        right += ((lower_a == spared_a) & ~ties).sum() + 0.5 * ties.sum()
        pairs += int(differ.sum())
    return (right / pairs if pairs else float("nan")), pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="takecover")
    parser.add_argument("--starts", type=int, default=32)
    parser.add_argument("--hold", type=int, default=10)
    parser.add_argument("--prefix", type=int, default=250, help="random real steps before the hold (at most)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=1.0, help="scale of the dream's sampling noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "action_response.json"))
    args = parser.parse_args()

    model, _, _ = load_world(args.checkpoint)
    cfg = model.config
    A, K, rng = cfg.num_actions, cfg.context_frames, np.random.default_rng(args.seed)
    contexts, context_actions, real_holds, real_drops = [], [], [], []
    seed = FRESH_SEED + args.seed * 10_000
    while len(contexts) < args.starts:
        seed += 1
        prefix = rng.integers(0, A, int(rng.integers(K, args.prefix + 1)))
        branch = real_branches(cfg.env_id, cfg.obs_key, cfg.env_kwargs, seed, prefix, A, args.hold, cfg.frame_size)
        if branch is None:
            continue
        context, hold_frames, drops = branch
        contexts.append(context[-K:])
        context_actions.append(prefix[-(K - 1):])
        real_holds.append(hold_frames)
        real_drops.append(drops)
    real_holds, real_drops = np.stack(real_holds), np.stack(real_drops).astype(np.float64)  # (N, A, hold, ...), (N, A, V)
    real_last = real_holds[:, :, -1]
    real_steps = real_head_risk(model, np.stack(contexts), np.stack(context_actions), real_holds)  # (N, A, hold, E)
    real_risk = real_steps.mean(2)

    # the dream: every start under every action as one batch, rows (start, action), the same noise per start
    N = args.starts
    frames = torch.from_numpy(np.stack(contexts)).repeat_interleave(A, 0)
    actions = torch.from_numpy(np.stack(context_actions)).long().repeat_interleave(A, 0)
    held = torch.arange(A).repeat(N)
    g = torch.Generator().manual_seed(args.seed)
    state = model.start(frames, actions, g, args.guidance)
    risks = []
    for _ in range(args.hold):
        noise = torch.randn(N, model.tokens_per_frame, model.token_dim, generator=g).repeat_interleave(A, 0)
        step = model.sample_next(state, held, noise=noise, temperature=args.temperature)
        risks.append(step.event_risk.numpy())
    dream_last = step.frames.numpy().reshape(N, A, *step.frames.shape[1:])
    dream_steps = np.stack(risks, 1).reshape(N, A, args.hold, -1)  # (N, A, hold, E)
    dream_risk = dream_steps.mean(2)

    meanings, events = list(cfg.action_meanings), list(cfg.event_names)
    real_diff, dream_diff = mean_pairwise_difference(real_last), mean_pairwise_difference(dream_last)
    print(f"{args.checkpoint}: {N} real starts, each action held {args.hold} steps (guidance {args.guidance}, "
          f"temperature {args.temperature})")
    print("last frames apart, grey levels per pixel (real / dream):")
    for a, b in itertools.combinations(range(A), 2):
        print(f"  {meanings[a]:>12} vs {meanings[b]:<12} {real_diff[a, b]:6.2f} / {dream_diff[a, b]:6.2f}")
    # the collector names a game variable's drop VAR_drop; other events (ALE's life_lost) are not replayed here
    probe = make_env(cfg.env_id, cfg.obs_key, **cfg.env_kwargs)
    variables = probe.variable_names()
    probe.close()
    replayed = {name: variables.index(name.removesuffix("_drop")) for name in events
                if name.endswith("_drop") and name.removesuffix("_drop") in variables}  # event -> its variable
    real_rate = {name: real_drops[..., replayed[name]].mean(0) if name in replayed else np.full(A, np.nan)
                 for name in events}
    print("event within the hold: real rate / heads' mean risk on the real frames / on the dream's")
    for e, name in enumerate(events):
        rates = real_rate[name]
        print(f"  {name}: " + ", ".join(f"{meanings[a]} {rates[a]:.2f} / {real_risk[:, a, e].mean():.2f} / "
                                        f"{dream_risk[:, a, e].mean():.2f}" for a in range(A)))
    agreement = {}
    for e, name in enumerate(events):
        if name in replayed:
            outcome = real_drops[..., replayed[name]] > 0  # (N, A)
            # over the hold (the frames may show the hit) and at its first step (a prediction, what an agent decides on)
            # state-blind: each action's mean risk at every start (what ranking the actions on average earns)
            blind = np.broadcast_to(real_steps[:, :, 0, e].mean(0), outcome.shape)
            (real_mean, pairs), (dream_mean, _), (real_first, _), (dream_first, _), (blind_first, _) = (
                ranking_agreement(outcome, r) for r in
                (real_risk[..., e], dream_risk[..., e], real_steps[:, :, 0, e], dream_steps[:, :, 0, e], blind))
            agreement[name] = dict(pairs=pairs, real_frames=real_mean, dream=dream_mean, real_frames_first_step=real_first,
                                   dream_first_step=dream_first, state_blind=blind_first)
            print(f"  {name}, per start: of {pairs} action pairs the game tells apart, the spared one has the lower "
                  f"risk over the hold / at its first step: real frames {real_mean:.2f} / {real_first:.2f}, dream "
                  f"{dream_mean:.2f} / {dream_first:.2f}; state-blind (each action's mean risk) {blind_first:.2f}")
    result = dict(checkpoint=str(args.checkpoint), starts=N, hold=args.hold, guidance=args.guidance,
                  temperature=args.temperature,
                  actions=meanings, real_difference=real_diff.tolist(), dream_difference=dream_diff.tolist(),
                  events=events, real_event_rate={k: v.tolist() for k, v in real_rate.items()},
                  real_frames_event_risk=real_risk.mean(0).tolist(), dream_event_risk=dream_risk.mean(0).tolist(),
                  ranking_agreement=agreement)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
