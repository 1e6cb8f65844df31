"""Imagined rollouts: workers that each hold a world model and a batched WorldFlowVectorEnv, in this
process or as Ray actors that get the latest policy weights, roll out, and return trajectories."""

import numpy as np
import torch

from worldflow.envs import WorldFlowVectorEnv

from .actor_critic import ActorCritic, AgentSpec, FrameStack


class RolloutWorker:
    """N dreams as one vector env, continued across calls; episodes start from real start contexts."""

    def __init__(self, spec: AgentSpec, checkpoint, num_envs: int, horizon: int, seed: int, worker_id: int = 0,
                 threads: int = 0, sample_termination: bool = False, guidance: float | None = None,
                 device: str = "cpu", sampler: str = "jacobi", start_contexts: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.env = WorldFlowVectorEnv(num_envs=num_envs, checkpoint=checkpoint, max_episode_steps=horizon,
                                      sample_termination=sample_termination, guidance=guidance, device=device,
                                      sampler=sampler, observation=spec.observation,
                                      start_contexts=start_contexts)
        self.net = ActorCritic(spec).eval()
        self.generator = torch.Generator().manual_seed(seed)
        obs, info = self.env.reset(seed=seed)
        self.stack = FrameStack(obs, spec.frame_stack)
        self.risk = info["event_risk"]  # (N, E) the world's event risks at each dream's current frame
        self.ended = np.zeros(num_envs, dtype=bool)  # the next step of these rows is an autoreset step
        self.episode_return = np.zeros(num_envs)

    @torch.no_grad()
    def rollout(self, weights: dict, steps: int) -> dict:
        """`steps` steps of every dream under the given policy weights -> a trajectory of numpy arrays:
        stacks (T+1, N, K, S, S, 3) uint8 (or features (T+1, N, K, F) float32), event_risk (T+1, N, E) at
        the same frames, actions / rewards / terminated / truncated / reset_step (T, N), plus the returns of
        the episodes that ended and this worker's id."""
        self.net.load_state_dict(weights)
        stacks, actions, rewards, terminated, truncated, resets, returns = [self.stack.frames.copy()], [], [], [], [], [], []
        risks = [self.risk]
        for _ in range(steps):
            action = self.net.act(self.stack.frames, self.generator)
            obs, reward, term, trunc, info = self.env.step(action)
            self.risk = info["event_risk"]
            risks.append(self.risk)
            reset_step, self.ended = self.ended, term | trunc  # NEXT_STEP autoreset: a reset step ignores its action
            self.episode_return = np.where(reset_step, 0.0, self.episode_return + reward)
            returns += list(self.episode_return[self.ended])
            stacks.append(self.stack.push(obs, reset_step).copy())
            actions.append(action)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
            resets.append(reset_step)
        return dict(stacks=np.stack(stacks), event_risk=np.stack(risks).astype(np.float32),
                    actions=np.stack(actions), rewards=np.stack(rewards).astype(np.float32),
                    terminated=np.stack(terminated), truncated=np.stack(truncated), reset_step=np.stack(resets),
                    episode_returns=np.array(returns, np.float32), worker_id=self.worker_id)


class RolloutPool:
    """K Ray actors (or, with K = 0, one worker in this process). A worker that dies is replaced by a
    fresh one with a new seed; its trajectory for that round is lost and training goes on."""

    def __init__(self, spec: AgentSpec, checkpoint, workers: int, num_envs: int, horizon: int, seed: int,
                 ray_address: str | None = None, sample_termination: bool = False, guidance: float | None = None,
                 device: str = "cpu", gpus_per_worker: float = 0.0, sampler: str = "jacobi",
                 start_contexts: str | None = None):
        self.args = (spec, None if checkpoint is None else str(checkpoint), num_envs, horizon)
        # start_contexts is a file path: Ray workers on other machines need it at the same path
        self.options = dict(sample_termination=sample_termination, guidance=guidance, device=device, sampler=sampler,
                            start_contexts=start_contexts)
        self.seed, self.replaced, self.remote = seed, 0, workers > 0
        if not self.remote:
            self.workers = [RolloutWorker(*self.args, seed, **self.options)]
            return
        from worldflow.scale import init_ray

        self.ray = ray = init_ray(ray_address)
        # a worker given a GPU fraction dreams on the GPU Ray assigns it ("cuda" is that device inside it)
        self.actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(RolloutWorker)
        if gpus_per_worker > 0:
            self.options["device"] = "cuda"
        self.workers = [self._start(i, i) for i in range(workers)]

    def _start(self, worker_id: int, nth: int):
        return self.actor.remote(*self.args, self.seed * 1000 + nth, worker_id, threads=1, **self.options)

    def collect(self, net: ActorCritic, steps: int) -> list[dict]:
        """One trajectory from every live worker, all under the same current policy weights."""
        weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        if not self.remote:
            return [self.workers[0].rollout(weights, steps)]
        ref = self.ray.put(weights)
        futures = [w.rollout.remote(ref, steps) for w in self.workers]
        trajectories = []
        for i, future in enumerate(futures):
            try:
                trajectories.append(self.ray.get(future))
            except self.ray.exceptions.RayActorError:  # the worker died (killed, OOM, lost node): replace it
                self.replaced += 1
                self.workers[i] = self._start(i, len(self.workers) + self.replaced)
        return trajectories

    def close(self) -> None:
        if self.remote:
            for w in self.workers:
                self.ray.kill(w)
