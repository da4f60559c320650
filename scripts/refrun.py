"""What the reference runs (scripts/peft_*.py) share: progress lines with rate and ETA, and the
process's peak memory."""

import resource
import sys
import time

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Progress:
    """tqdm when installed, otherwise a line every ~10 s with rate and ETA."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True) if tqdm else None

    def update(self, n=1, **postfix):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        now = time.perf_counter()
        if now - self.last >= 10 or self.n == self.total:
            self.last = now
            rate = self.n / (now - self.t0)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {rate:.3f}/s eta {eta:.0f}s {extra}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
