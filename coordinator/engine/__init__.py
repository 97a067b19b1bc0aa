"""The round engine: scheduling, selection, staleness, aggregation and the device work flow.

::

    config      AggregationConfig parsed from Task.aggregation
    staleness   s(tau) and update weights
    strategies  server step (FedAvg, FedAvgM, FedAdam, FedYogi)
    aggregate   streaming weighted sum of sparse updates into one dense buffer
    selection   eligibility and reliability-informed device selection
    leases      named per-task leases so one coordinator process acts for a task
    rounds      open / close / fail / aggregate rounds (the state machine)
    scheduler   the loop in the app lifespan that drives ``rounds``
    updates     accepting an upload
    examples    how many of an update's claimed examples count for its weight
    work        what the work long-poll answers
    longpoll    the long-poll's wait, with batched re-checks
    taskcache   parsed task configurations, per process
    notify      in-process wake-ups for long-polls
    evalhook    optional server-side evaluation after each aggregation

See docs/rounds.md for the behaviour these modules implement.
"""
