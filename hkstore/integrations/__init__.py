"""hkstore.integrations: one sub-package per federated-learning framework.

Each sub-package imports only its framework and hkstore's public API (``hkstore``, and the
store's documented tier ``hkstore.store``), and comes with an extra of its own
(``pip install 'hkstore[declearn]'``...). Importing this package imports no framework.

- ``hkstore.integrations.declearn``: reading declearn 2.x HaikuModel checkpoints without
  unpickling them (:func:`~hkstore.integrations.declearn.convert`; needs no declearn).
- ``hkstore.integrations.flower``: model weights as Flower ``ArrayRecord`` values and back,
  and Flower runs that checkpoint every round and resume exactly (``[flower]`` extra).
"""
