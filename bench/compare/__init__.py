"""Balancing methods compared: the named scenarios (``scenarios``), the side-by-side run
(``run``; ``python -m bench.compare``), its reports (``report``), runs pooled over seeds
(``pool``), the front door across rank counts (``scale``) and a burst trace replayed
through the dispatcher (``balance``)."""
