"""labtwin: a digital-twin battery test lab orchestrator.

Sign convention for all of labtwin: positive current charges the cell.
"""

__version__ = "0.1.0"
