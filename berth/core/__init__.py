"""The floor every layer stands on: typed config, errors, hub access, shared text and vocabulary helpers.

Nothing here imports any other part of berth, and nothing heavy is imported at package level, so the command line
can switch the hub libraries to offline mode before they load.
"""
