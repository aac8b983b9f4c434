"""A deliberately slow strategy (`slow_strategy:slow_avg_all_heads`) so that a test can kill a run mid-way."""

import time

from fastv_advanced.strategies import avg_all_heads


def slow_avg_all_heads(attention, config):
    """avg_all_heads after a pause. [batch, heads, n_image] -> [batch, n_image]."""
    time.sleep(0.4)
    return avg_all_heads(attention, config)
