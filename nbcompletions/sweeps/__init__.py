"""A sweep as the stages a request passes through, one module each:

- `plan`: the grid, this run's shard of it, what the cache lacks, the budget, the endpoint's
  report applied (`plan_sweep`, `check_endpoint`);
- `source`: pending work from the cache, claimed so that processes sharing it do not both pay
  (`PendingSource`), and answers stored back (`CacheCommits`);
- `sender`: live workers (`LiveSender`) or the Batch API (`BatchSender`) behind one `Sender`;
- `sink`: the finished points, in memory or in a Parquet dataset (`dataset`) whose writer owns
  its directory;
- `finish`: the usage and the `SweepResult`.

`outcome` is what became of one request, with the one reader of a response's ``usage``; `frames`
turns outcomes into the sweep's frames. `nbcompletions.sweep` drives them.
"""

__all__: list[str] = []
