"""The forward-process pair (``--algorithm nft``: DiffusionNFT, ``--algorithm awm``: Advantage Weighted
Matching), one loop for both: ``loop.py``, ``loss.py`` their losses, ``settings.py`` the ``nft`` and ``awm``
groups, ``checks.py`` their configuration check."""
