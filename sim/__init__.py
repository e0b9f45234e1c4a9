"""The simulated accelerator: an executor whose forward pass is a cost model's sleep
(``sim.executor``), ranks stepping together as with DP attention (``sim.lockstep``)
and the profiles of costs (``sim/profiles/*.json``, ``bench/PROFILES.md``)."""
