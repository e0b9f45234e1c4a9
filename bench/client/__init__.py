"""The benchmark client: prompts (``dataset``), one timed request per backend
(``backends``), the figures (``metrics``), the open-loop run (``serving``) and the server
under test (``server``)."""
