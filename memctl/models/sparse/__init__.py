"""Sparse memories (Rae et al. 2016, "Scaling Memory-Augmented Neural Networks with Sparse
Reads and Writes", arXiv 1610.09027): the in-place memory and its gradients
(``access.py``), the slot search (``index.py``, exact; ``faiss_index.py``, approximate),
the least-recently-used slot (``usage.py``), SAM (``sam.py``), the SDNC (``sdnc.py``) and
pytorch-dnc's drop-ins ``SAM`` and ``SDNC`` (``compat.py``)."""
