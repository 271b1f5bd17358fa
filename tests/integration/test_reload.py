"""A catalogue with errors never takes down a running coordinator (SIGHUP reload)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.harness import Cluster, EventRecorder

CATALOGUE = Path(__file__).parent / "catalogues" / "seconds.toml"


def test_bad_catalogue_reload_is_refused_and_a_good_one_applies(
    amqp_url: str, zk_hosts: str, tmp_path: Path
) -> None:
    live = tmp_path / "catalogue.toml"
    good = CATALOGUE.read_text()
    live.write_text(good)
    c = Cluster(amqp_url, zk_hosts, live, tmp_path)
    rec = EventRecorder(amqp_url).start()
    try:
        c.worker("w-master", "Master")
        c.worker("w-proc", "Processing,Calculation")
        coord = c.coordinator("coord-a")
        assert rec.wait_for(lambda r: r.service == "Tick" and r.state == "succeeded", 30), \
            c.logs()

        # A broken file: refused with the error, the last good catalogue keeps running.
        live.write_text(good.replace("cron = \"* * * * * */2\"", "cron = \"61 * * * *\""))
        os.kill(coord.pid, signal.SIGHUP)
        time.sleep(1.0)
        log = coord.log.read_text(errors="replace")
        assert "catalogue reload refused" in log and "Tick" in log and "cron" in log, log[-2000:]
        after = time.time()
        assert rec.wait_for(lambda r: r.service == "Tick" and r.state == "succeeded"
                            and (r.started_at or 0) > after, 10), c.logs()
        assert coord.alive()

        # A good file with one more service: the leader rebuilds and runs it.
        extra = ('\n[[service]]\nname = "Newcomer"\nkind = "cron"\ncron = "* * * * * */2"\n'
                 'allowed_roles = ["Master"]\nutility = "workers.demo:noop"\n')
        live.write_text(good + extra)
        # Workers check orders against their own catalogue: they reload it on SIGHUP too.
        os.kill(c.procs["w-master"].pid, signal.SIGHUP)
        os.kill(coord.pid, signal.SIGHUP)
        assert rec.wait_for(lambda r: r.service == "Newcomer" and r.state == "succeeded", 20), \
            c.logs()
        assert rec.wait_for(lambda r: r.service == "Tick" and r.state == "succeeded"
                            and (r.started_at or 0) > time.time() - 2, 10), c.logs()
    finally:
        c.close()
        rec.stop()
