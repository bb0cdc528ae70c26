"""Run reports: ``build`` (one run -> report.html + README.md, from ``predictions``,
``figures``, ``context`` and ``render``), ``compare`` (several runs -> one page), ``plots``
(the figures). Templates live in ``templates/`` (package data).
"""
