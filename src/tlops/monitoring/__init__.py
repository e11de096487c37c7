"""Watching the champion in production: the prediction log ``tlops serve`` writes (:mod:`.predlog`), the service
metrics it exposes (:mod:`.service`), the reference record the evaluate step logs with each candidate
(:mod:`.reference`) and ``tlops monitor``, which compares a window of served traffic with it (:mod:`.monitor`).

Nothing here is imported by the logged model's own code: the pyfunc runs without it."""
