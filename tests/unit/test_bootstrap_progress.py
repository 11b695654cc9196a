"""The bootstrap's progress lines: the time left comes from the DDPM's pace, not from its first step."""

import logging

from daemon.bootstrapping import progress_logger


def test_time_left_is_the_pace_after_the_first_step(caplog):
    now = [0.0]
    report = progress_logger("m", logging.getLogger("test.bootstrap"), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "test.bootstrap"):
        now[0] = 30.0  # the first step pays the one-off costs
        report("ddpm", 1, 1000)
        for step in range(2, 1001):
            now[0] += 0.5  # then half a second per step
            report("ddpm", step, 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert "DDPM step 1/1000, 30s elapsed" in lines[0] and "left" not in lines[0].split("(")[0]
    assert len(lines) == 11, lines  # the first step, then every 10 %
    assert lines[1].startswith("bootstrapping m: DDPM step 101/1000 (10%), 80s elapsed"), lines[1]
    assert lines[1].endswith("about 450s left"), lines[1]  # 899 steps at 0.5 s; the first step's pace said 7.5 h
    assert lines[-1].endswith("about 0s left")
