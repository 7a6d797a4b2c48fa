"""The book's helpers on Flower's deployment engine (Chapter 7).

* :mod:`~helpers.flower.task`: what the Flower app and the simulator share (run config -> settings,
  codecs by name, node partitions, initial model, payloads as Flower records);
* :mod:`~helpers.flower.client_app` and :mod:`~helpers.flower.server_app`: the ClientApp and ServerApp
  that ``app/pyproject.toml`` names (``flwr run helpers/flower/app <connection>``);
* :mod:`~helpers.flower.launch`: a SuperLink and N SuperNodes on 127.0.0.1 that run the app and clean up
  (``python -m helpers.flower.launch``, ``make flower``).

Nothing here is imported by ``import helpers``: only code that uses Flower pays for importing it.
"""
