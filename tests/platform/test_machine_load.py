"""Machine load from /proc: sane figures here, and `busy` from either the sample or the load average."""

import sys

import pytest

from hayabusa.engine.platform.machine_load import MachineLoad, measure_machine_load


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_measured_load_is_within_the_machine():
    load = measure_machine_load(sample_s=0.05)
    assert load.cpus >= 1 and load.loadavg_1m is not None and load.loadavg_1m >= 0
    assert load.other_busy_cpus is not None and 0 <= load.other_busy_cpus <= load.cpus
    for process in load.busiest_processes:
        assert set(process) == {"pid", "cpu_pct", "command"} and process["cpu_pct"] > 0
    assert load.as_dict()["busy"] == load.busy


@pytest.mark.parametrize(("loadavg", "other_busy", "busy", "others_busy"),
                         [(0.2, 0.1, False, False), (1.5, 0.1, True, False), (0.2, 1.0, True, True),
                          (None, None, False, False)])
def test_busy_when_others_hold_half_the_cpus(loadavg, other_busy, busy, others_busy):
    load = MachineLoad(cpus=2, loadavg_1m=loadavg, other_busy_cpus=other_busy, busiest_processes=[])
    assert (load.busy, load.others_busy) == (busy, others_busy)
