"""Two neuron processes started with the same node id and the same identity key (a cloned
machine: its machine-id and its data directory copied): each join pushed the other out and
each redialed at once, so both flapped for ever (35 joins in a minute), failing whatever ran
on the one pushed out. The one pushed out now stops with one line saying why, exit 3 (as for
a refused join: systemd does not restart it), and the newer one stays joined. (A second
neuron with another key is refused instead: ``test_neuron_identity_e2e.py``.)"""

from __future__ import annotations

import time

from procs import ProcGroup


def test_a_second_neuron_with_the_same_node_id_pushes_the_first_out_for_good(tmp_path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex()
        cloned = {"HELEXA_DATA_DIR": str(tmp_path / "cloned-data")}  # one data directory: one identity key
        first = procs.neuron(cortex, "twin", env=cloned)
        second = procs.neuron(cortex, "twin", env=cloned, wait=False)
        assert first.popen.wait(20) == 3
        assert "another neuron joined" in first.log() and "each neuron needs its own node_id" in first.log()
        assert "Traceback" not in first.log()
        cortex.wait_neuron("twin")
        time.sleep(3)  # no flapping: the second one stays, joined once
        assert second.alive
        assert second.log().count("joined cortex") == 1
        assert cortex.log().count("neuron twin joined from") == 2
