"""Run reports: ``build`` (one run -> report.html + README.md), ``compare`` (several runs ->
one page), ``plots`` (the figures). Templates live in ``templates/`` (package data).
"""
