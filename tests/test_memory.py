import itertools
from types import SimpleNamespace

import pytest
import torch

import fluxnb
from fluxnb.memory import (MemoryTracker, StepTimer, anon_ram_bytes, course_ram_peak_gib, plot_records,
                           records_to_markdown)


def test_bytes_to_giga_bytes_is_gib():
    assert fluxnb.bytes_to_giga_bytes(2**30) == 1.0
    assert fluxnb.bytes_to_giga_bytes(15360 * 2**20) == 15.0  # a T4's 15360 MiB


def test_tracker_measures_a_known_allocation():
    tracker = MemoryTracker(interval_s=0.005)
    size = 768 * 2**20
    with tracker.stage("baseline"):
        pass
    with tracker.stage("hold 768 MiB"):
        block = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        assert block.sum() > 0
        del block
    with tracker.stage("after"):
        pass
    base, held, after = tracker.records
    grew = (held.ram_anon_gib - base.ram_anon_gib) * 2**30
    assert grew == pytest.approx(size, rel=0.15)
    assert after.ram_anon_gib < held.ram_anon_gib - 0.5
    assert held.seconds >= 0
    assert held.ram_maxrss_gib >= held.ram_anon_gib * 0.9


def test_tracker_keeps_a_peak_that_flush_resets():
    tracker = MemoryTracker(interval_s=10.0)  # the poll never fires: only flush's own sample can see it
    with tracker.stage("peak then flush"):
        base = anon_ram_bytes()
        block = torch.ones(512 * 2**20 // 4)
        assert anon_ram_bytes() - base > 400 * 2**20
        fluxnb.flush()  # samples the running stage (the tensor is still held) before resetting peaks
        del block  # gone before the stage ends: only flush's sample saw it
    (rec,) = tracker.records
    assert rec.ram_anon_gib * 2**30 - base > 400 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_vram_fields_are_absent_not_zero_on_cpu():
    tracker = MemoryTracker()
    with tracker.stage("x"):
        pass
    rec = tracker.records[0]
    assert rec.vram_allocated_gib is None and rec.vram_reserved_gib is None and rec.vram_device_gib is None
    table = tracker.to_markdown()
    assert "VRAM" not in table and "RAM anon" in table


def test_host_ram_is_shown_as_anonymous_memory_only():
    """One host-RAM figure: the lifetime max RSS is recorded (the benchmarks' notes use it), never shown."""
    tracker = MemoryTracker()
    with tracker.stage("x"):
        pass
    (rec,) = tracker.records
    assert rec.ram_maxrss_gib > 0 and "ram_maxrss_gib" in rec.as_dict()
    head = tracker.to_markdown().splitlines()[0]
    assert "RAM anon (GiB)" in head and "maxrss" not in head.lower() and "RSS" not in head
    fig = tracker.plot()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][-1] == "RAM anon (GiB)"
    assert all("rss" not in t.get_text().lower() for t in fig.axes[0].get_legend().get_texts())
    records = [dict(stage="s", ram_anon_gib=1.0, ram_maxrss_gib=9.0)]
    assert records_to_markdown(records).splitlines()[0] == "| stage | RAM anon (GiB) |"
    assert "9.00" in records_to_markdown(records, columns=["stage", "ram_maxrss_gib"])  # asked for by name


def test_a_course_runs_host_ram_is_the_smaller_upper_bound():
    """The summed anonymous memory counts a forked child's shared pages twice; the cgroup counts file pages."""
    # 09_faster inside colab-t4: torch.compile's forked workers made the sum exceed the cgroup's peak
    assert course_ram_peak_gib(dict(ram_anon_peak_gib=7.758, ram_peak_gib=2.861)) == 2.861
    # 03_generate: the cgroup filled with the weight files' pages up to the cap; anonymous memory did not
    assert course_ram_peak_gib(dict(ram_anon_peak_gib=6.926, ram_peak_gib=12.0)) == 6.926
    assert course_ram_peak_gib(dict(ram_anon_peak_gib=0.57, ram_peak_gib=None)) == 0.57  # RAM not enforced
    assert course_ram_peak_gib(dict(ram_anon_peak_gib=None, ram_peak_gib=None)) is None


def test_markdown_and_plot_show_every_stage():
    records = [dict(recipe="a", stage="s1", seconds=1.0, vram_device_gib=None, ram_anon_gib=0.5),
               dict(recipe="a", stage="s2", seconds=2.0, vram_device_gib=None, ram_anon_gib=1.5)]
    table = records_to_markdown(records).splitlines()
    assert table[0] == "| recipe | stage | time (s) | RAM anon (GiB) |"
    assert table[3] == "| a | s2 | 2.00 | 1.50 |"
    fig = plot_records(records)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == [0.5, 1.5]


def test_step_timer_median_skips_the_first_step(monkeypatch):
    # creation, then 4 step ends: 5 s warm-up, then 1, 1.5, 1 (then any later reading)
    clock = itertools.chain([0.0, 5.0, 6.0, 7.5, 8.5], itertools.count(100.0))
    monkeypatch.setattr("fluxnb.memory.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    timer = StepTimer()
    for step in range(4):
        assert timer(None, step, None, {"latents": 1}) == {"latents": 1}
    assert timer.step_seconds == [5.0, 1.0, 1.5, 1.0]
    assert timer.seconds_per_step == 1.0
    with pytest.raises(ValueError, match="no step was timed"):
        _ = StepTimer().seconds_per_step
