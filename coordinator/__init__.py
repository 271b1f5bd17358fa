"""The coordinator side: the leader and its pure scheduling core.

    leader.py     Coordinator: contends, and per term resumes from the ledger and runs the
                  turn loop; builds the snapshot the page and table read
    inbox.py      typed items other threads hand the turn loop (deliveries, node views, ...)
    intake.py     what a turn does with each item: reports, requests, membership -> engine
    outbox.py     ledger first, then orders, controls, records and acks; one retry policy
    forms.py      a run as order, daemon control, event record and ledger entry
    ledger.py     the keys of the fenced store, and restoring engine state from them
    view.py       the service table rows (from the engine's computations) and the snapshot
    metrics.py    Prometheus metrics
    audit.py      checks a run history against the contract
    core/         the pure engine (no broker, ZooKeeper or metrics): see core/engine.py
"""
