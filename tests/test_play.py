"""Play mode, headless (SDL_VIDEODRIVER=dummy): keys reach the env as actions, reset, record, compare."""

import gymnasium as gym
import numpy as np
import pygame
import pytest

from worldflow.cli import main
from worldflow.envs import WorldFlowEnv
from worldflow.envs.play import Player, action_for

BREAKOUT = ["NOOP", "FIRE", "RIGHT", "LEFT"]
BOXING = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE",
          "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]


class ActionLog(gym.Wrapper):
    """Remembers every action and reset the player sends."""

    def __init__(self, env):
        super().__init__(env)
        self.actions, self.resets = [], 0

    def reset(self, **kwargs):
        self.resets += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        self.actions.append(action)
        return self.env.step(action)


@pytest.fixture
def env(endless_world):
    return ActionLog(WorldFlowEnv(checkpoint=str(endless_world)))


def _key(kind, key):
    pygame.event.post(pygame.event.Event(kind, key=key, mod=0, unicode="", scancode=0))


def test_held_keys_map_to_the_games_actions():
    assert action_for(set(), BREAKOUT) == 0
    assert action_for({"RIGHT"}, BREAKOUT) == 2
    assert action_for({"FIRE"}, BREAKOUT) == 1
    assert action_for({"UP", "RIGHT", "FIRE"}, BOXING) == BOXING.index("UPRIGHTFIRE")
    assert action_for({"DOWN", "LEFT"}, BOXING) == BOXING.index("DOWNLEFT")
    # a combination the game lacks falls back to the action covering most of it
    assert action_for({"LEFT", "FIRE"}, BREAKOUT) in (1, 3)


def test_synthetic_keys_reach_the_env_frames_change_and_r_resets(env):
    player = Player(env, seed=0)
    assert env.resets == 1
    _key(pygame.KEYDOWN, pygame.K_RIGHT)
    player.tick()
    _key(pygame.KEYDOWN, pygame.K_SPACE)  # RIGHT + FIRE: Breakout has no such action, so one of them
    player.tick()
    _key(pygame.KEYUP, pygame.K_RIGHT)
    _key(pygame.KEYUP, pygame.K_SPACE)
    player.tick()
    _key(pygame.KEYDOWN, pygame.K_LEFT)
    player.tick()
    assert env.actions == [2, env.actions[1], 0, 3] and env.actions[1] in (1, 2)
    frames = [player.obs.copy()]
    for _ in range(3):
        player.tick()
        frames.append(player.obs.copy())
    assert any(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    assert player.episode_steps == 7
    _key(pygame.KEYDOWN, pygame.K_r)
    player.tick()
    assert env.resets == 2 and player.episode_steps == 1  # a new episode, then this tick's step
    _key(pygame.KEYDOWN, pygame.K_p)
    player.tick()
    assert len(env.actions) == 8  # paused: no step
    player.close()


def test_compare_shows_the_real_game_beside_the_dream_both_starting_equal(env):
    player = Player(env, scale=2, compare=True, seed=0)
    player.draw()
    screen = pygame.surfarray.array3d(player.screen).swapaxes(0, 1)
    side = 64 * 2
    assert screen.shape[1] == 2 * side
    dream, real = screen[:side - 20, :side], screen[:side - 20, side:]  # above the pane labels
    assert real.std() > 0  # the real game is drawn
    np.testing.assert_array_equal(dream, real)  # the dream starts from the real game's own frames
    np.testing.assert_array_equal(real[::2, ::2], player.real_frame[:side // 2 - 10])
    player.tick()
    assert player.real_frame.shape == (64, 64, 3)
    player.close()


def test_play_records_every_shown_frame(tiny_run, tmp_path, capsys):
    from moviepy import VideoFileClip

    out, shot = tmp_path / "play.mp4", tmp_path / "shot.png"
    assert main(["play", str(tiny_run[1]), "--autoplay", "random", "--max-steps", "6", "--fps", "0",
                 "--scale", "2", "--record", str(out), "--screenshot", str(shot), "--seed", "0"]) == 0
    assert pygame.image.load(str(shot)).get_size() == (128, 128 + 64)
    clip = VideoFileClip(str(out))
    n = sum(1 for _ in clip.iter_frames())
    size = clip.size
    clip.close()
    assert n == 7 and size == [128, 128 + 64]  # the first frame, then one per step; the HUD below
    assert not list(tmp_path.glob(".*tmp*"))
    assert "played 6 steps" in capsys.readouterr().out
