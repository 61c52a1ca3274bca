"""Developer tools run by make targets: the demo, the generated troubleshooting page.

Nothing at runtime imports them.
"""
