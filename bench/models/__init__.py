"""Process-free models: lockstep ranks as a queueing model (``lockstep_model``) and the
simulated accelerator's cost model fitted to the real model (``calibrate``)."""
