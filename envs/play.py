"""Play a WorldFlow world in a pygame window: keys become the game's actions, a HUD shows the model.

The loop is event-driven (KEYDOWN / KEYUP maintain the held keys): under SDL_VIDEODRIVER=dummy,
posted key events reach pygame.event.get() but not pygame.key.get_pressed(), and tests drive it so.
A policy (`autoplay`, or an `agent` the M key hands control to) is any callable obs -> action; one
with a `reset()` method is told when an episode starts. This module never imports a policy.
"""

import time
from pathlib import Path

import numpy as np

from worldflow.collect import make_env, resize_frames
from worldflow.world_model import DENOISERS, SAMPLERS

ATOMS = ("UP", "DOWN", "LEFT", "RIGHT", "FIRE")
HUD_HEIGHT = 64
HELP = ["arrows / space: move / FIRE (and the combinations the game has)", "R: reset from a real start",
        "P: pause", "S: switch sampler", "D: switch denoiser", "M: hand control to the agent and back",
        "H: this help", "Esc or close: quit"]


def action_atoms(meaning: str) -> frozenset:
    """ALE meaning -> its parts: 'UPRIGHTFIRE' -> {UP, RIGHT, FIRE}; 'NOOP' -> {}."""
    return frozenset(a for a in ATOMS if a in meaning.upper())


def action_for(held: set, meanings: list[str]) -> int:
    """The action whose parts equal the held keys' parts, else the one covering most of them (NOOP if none)."""
    best, best_score = 0, -1
    for i, meaning in enumerate(meanings):
        atoms = action_atoms(meaning)
        if atoms == held:
            return i
        if atoms <= held and len(atoms) > best_score:
            best, best_score = i, len(atoms)
    return best


class Player:
    """A play-through: one dream pane (and the real game's beside it with `compare`), a HUD, recording."""

    def __init__(self, env, scale: int = 8, fps: int | None = None, autoplay=None, agent=None, compare: bool = False,
                 record=None, screenshot=None, seed: int | None = None):
        import pygame

        self.pg = pygame
        self.env, self.world = env, env.unwrapped
        self.meanings = list(self.world.action_meanings)
        self.scale = scale
        self.fps = env.metadata["render_fps"] if fps is None else fps  # 0: as fast as the model goes
        self.autoplay, self.agent = autoplay, agent
        config = self.world.model.config
        self.real = make_env(config.env_id, config.obs_key, **config.env_kwargs) if compare else None
        self.record_path = None if record is None else Path(record)
        self.screenshot = screenshot
        if self.record_path is not None and self.record_path.suffix != ".mp4":
            raise ValueError(f"--record writes mp4, got {self.record_path.name}")
        self.keys = {pygame.K_UP: "UP", pygame.K_DOWN: "DOWN", pygame.K_LEFT: "LEFT", pygame.K_RIGHT: "RIGHT",
                     pygame.K_SPACE: "FIRE"}
        self.held: set = set()
        self.paused = self.show_help = self.agent_in_control = self.quit = False
        self.message, self.steps, self.episode_steps, self.total_reward, self.info = "", 0, 0, 0.0, {}
        self.last_action = 0
        self.rng = np.random.default_rng(seed)
        size = env.observation_space.shape[0] * scale
        pygame.init()
        self.screen = pygame.display.set_mode((size * (2 if compare else 1), size + HUD_HEIGHT))
        pygame.display.set_caption("WorldFlow: " + str(self.world.model.config.env_id))
        self.font = pygame.font.Font(None, 20)
        self.clock = pygame.time.Clock()
        self.writer = None
        self.reset()

    # ---- the game ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new dream from a random real start context, or (compare) from the real game's frames."""
        seed = int(self.rng.integers(2**31))
        if self.real is None:
            self.obs, _ = self.env.reset(seed=seed)
        else:
            frames, actions = self._real_context(seed)
            self.obs, _ = self.env.reset(seed=seed, options={"frames": frames, "actions": actions})
        for policy in (self.autoplay, self.agent):
            if hasattr(policy, "reset"):
                policy.reset()
        self.episode_steps, self.total_reward, self.info = 0, 0.0, {}

    def _real_context(self, seed: int):
        """Reset the real game and let it run the dream's context window under NOOP: both panes start equal."""
        size = self.env.observation_space.shape[0]
        obs, _ = self.real.reset(seed=seed)
        frames = [obs]
        for _ in range(self.world.context_frames - 1):
            frames.append(self.real.step(0)[0])
        self.real_frame = resize_frames(frames[-1], size)
        return resize_frames(np.stack(frames), size), np.zeros(len(frames) - 1, np.int64)

    def action(self) -> int:
        if self.agent_in_control:
            return int(self.agent(self.obs))
        if self.autoplay is not None:
            return int(self.autoplay(self.obs))
        return action_for(self.held, self.meanings)

    def step(self) -> None:
        action = self.action()
        self.obs, reward, terminated, truncated, self.info = self.env.step(action)
        self.last_action, self.steps, self.episode_steps = action, self.steps + 1, self.episode_steps + 1
        self.total_reward += reward
        ended = terminated or truncated
        if self.real is not None:
            real_obs, _, real_term, real_trunc, _ = self.real.step(action)
            self.real_frame = resize_frames(real_obs, self.env.observation_space.shape[0])
            ended = ended or real_term or real_trunc
        if ended:
            self.reset()

    # ---- input ------------------------------------------------------------------------------------
    def handle(self, event) -> None:
        pg = self.pg
        if event.type == pg.QUIT or (event.type == pg.KEYDOWN and event.key == pg.K_ESCAPE):
            self.quit = True
        elif event.type == pg.KEYUP and event.key in self.keys:
            self.held.discard(self.keys[event.key])
        elif event.type == pg.KEYDOWN:
            if event.key in self.keys:
                self.held.add(self.keys[event.key])
            elif event.key == pg.K_r:
                self.reset()
            elif event.key == pg.K_p:
                self.paused = not self.paused
            elif event.key == pg.K_h:
                self.show_help = not self.show_help
            elif event.key == pg.K_s:
                self.world.sampler = SAMPLERS[(SAMPLERS.index(self.world.sampler) + 1) % len(SAMPLERS)]
            elif event.key == pg.K_d:
                self.world.denoiser = DENOISERS[(DENOISERS.index(self.world.denoiser) + 1) % len(DENOISERS)]
            elif event.key == pg.K_m:
                if self.agent is None:
                    self.message = "no agent: start with --agent PATH"
                else:
                    self.agent_in_control = not self.agent_in_control

    # ---- drawing ----------------------------------------------------------------------------------
    def _blit_frame(self, frame: np.ndarray, x: int) -> None:
        surface = self.pg.surfarray.make_surface(np.ascontiguousarray(frame.swapaxes(0, 1)))
        side = frame.shape[0] * self.scale
        self.screen.blit(self.pg.transform.scale(surface, (side, side)), (x, 0))

    def _text(self, text: str, x: int, y: int, color=(230, 230, 230)) -> None:
        self.screen.blit(self.font.render(text, True, color), (x, y))

    def draw(self) -> None:
        side = self.obs.shape[0] * self.scale
        self.screen.fill((0, 0, 0))
        self._blit_frame(self.obs, 0)
        if self.real is not None:
            self._blit_frame(self.real_frame, side)
            self._text("dream", 4, side - 18)
            self._text("real game", side + 4, side - 18)
        who = "agent" if self.agent_in_control else ("autoplay" if self.autoplay else "you")
        bpd = self.info.get("bits_per_dim")
        self._text(f"{self.clock.get_fps():5.1f} fps   step {self.episode_steps}   reward {self.total_reward:+.0f}   "
                   f"surprise {'-' if bpd is None else f'{bpd:.3f}'} bits/dim", 6, side + 6)
        self._text(f"sampler {self.world.sampler}   denoiser {self.world.denoiser}   control: {who}"
                   f"   action {self.meanings[self.last_action]}{'   PAUSED' if self.paused else ''}   H: help",
                   6, side + 26)
        if self.message:
            self._text(self.message, 6, side + 44, (255, 200, 80))
        if self.show_help:
            overlay = self.pg.Surface((side, side), self.pg.SRCALPHA)
            overlay.fill((0, 0, 0, 190))
            self.screen.blit(overlay, (0, 0))
            keys = [f"{m}: {' + '.join(sorted(action_atoms(m))) or 'no key'}" for m in self.meanings]
            for i, line in enumerate(HELP + ["", "actions:"] + keys):
                self._text(line, 10, 10 + 18 * i)
        self.pg.display.flip()

    def _record(self) -> None:
        if self.record_path is None:
            return
        frame = self.pg.surfarray.array3d(self.screen).swapaxes(0, 1)
        if self.writer is None:
            from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter

            self.tmp_path = self.record_path.with_name(f".{self.record_path.stem}.tmp.mp4")
            fps = self.fps or self.env.metadata["render_fps"]
            self.writer = FFMPEG_VideoWriter(str(self.tmp_path), (frame.shape[1], frame.shape[0]), fps,
                                             ffmpeg_params=["-pix_fmt", "yuv420p"])
        self.writer.write_frame(np.ascontiguousarray(frame))

    # ---- the loop ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """One frame of play: read input, advance the dream unless paused, draw, record."""
        for event in self.pg.event.get():
            self.handle(event)
        if not (self.paused or self.quit):
            self.step()
        self.draw()
        self._record()

    def run(self, max_steps: int | None = None) -> dict:
        """Play until the window closes, Esc, Ctrl-C or max_steps; the recording is finished in every case."""
        start, first = time.perf_counter(), self.steps
        try:
            self.draw()
            self._record()
            while not self.quit and (max_steps is None or self.steps < max_steps):
                self.tick()
                self.clock.tick_busy_loop(self.fps)  # tick() sleeps coarsely: 11.6 vs 12.5 frames/s at a 15 target here
        except KeyboardInterrupt:
            pass
        finally:
            self.close()
        seconds = time.perf_counter() - start
        return dict(steps=self.steps - first, seconds=seconds, fps=(self.steps - first) / max(seconds, 1e-9),
                    record=None if self.record_path is None else str(self.record_path))

    def close(self) -> None:
        if self.screenshot is not None:  # the last frame shown, as a PNG
            self.pg.image.save(self.screen, str(self.screenshot))
            self.screenshot = None
        if self.writer is not None:
            self.writer.close()
            self.tmp_path.replace(self.record_path)
            self.writer = None
        if self.real is not None:
            self.real.close()
        self.pg.display.quit()
