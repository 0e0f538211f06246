"""The fp64 reference of ARMT (Rodkin et al. 2024), run by ``pretrain.model.reference.ReferenceLM`` (the
registration's ``reference``), written from the equations independently of ``pretrain.ops.associative``:
explicit sums over the memory tokens, per batch row and head.  The segment is ``[tokens ; memory tokens]``
(causal, no mask edits); before layer l every position adds ``A_l^T phi(q) / (z_l . phi(q) + eps)``; after it
the M memory positions write (A_l, z_l) (delta rule against the state before the write, gamma correction, the
first-segment branch in a new stream); only the token positions reach the softmax.

Memory entries (the state's names): ``"armt.A<l>"`` [B, H, Dphi, Dv], ``"armt.z<l>"`` [B, H, Dphi]; absent
before the first segment (a fresh stream)."""
from __future__ import annotations

import torch


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP_nu (Schlag et al. 2021): x~ = [relu(x); relu(-x)], phi = concat_{j=1..nu} x~ * roll(x~, j)."""
    xt = torch.cat([torch.relu(x), torch.relu(-x)], -1)
    return torch.cat([xt * torch.roll(xt, shifts=j, dims=-1) for j in range(1, nu + 1)], -1)


class ARMTReference:
    def __init__(self, ref, cfg):
        self.ref, self.sec = ref, cfg.armt
        self.m, self.H = cfg.armt.num_mem_tokens, cfg.armt.heads
        self.d = cfg.d_model

    def w(self, name, l=None):
        t = self.ref.p(f"stack.memories.armt.{name}")
        return t if l is None else t[l]

    def phi(self, x):
        f = dpfp(x, self.sec.nu)
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.sec.normalize else f

    def heads(self, t):
        """[B, L, H * w] -> [B, H, L, w]."""
        return t.reshape(t.shape[0], t.shape[1], self.H, -1).transpose(1, 2)

    def begin(self, x, memory):
        B = x.shape[0]
        return torch.cat([x, self.w("memory")[None].expand(B, -1, -1)], 1)

    def end(self, x, out):
        return x[:, :-self.m]

    def layer_in(self, l, x, memory):
        A = memory.get(f"armt.A{l}")
        if A is None:                                   # a fresh stream reads nothing
            return x
        z = memory[f"armt.z{l}"]
        f = self.phi(self.heads(x @ self.w("W_mq", l).T))                  # [B, H, L, Dphi]
        num = torch.einsum("bhtf,bhfv->bhtv", f, A)
        den = torch.einsum("bhtf,bhf->bht", f, z)[..., None] + self.sec.eps
        o = num / den
        return x + o.transpose(1, 2).reshape(x.shape)

    def layer_out(self, l, x, memory, out):
        eps = self.sec.eps
        mem = x[:, -self.m:]
        f = self.phi(self.heads(mem @ self.w("W_mk", l).T))                # [B, H, M, Dphi]
        v = self.heads(mem @ self.w("W_mv", l).T)                           # [B, H, M, Dv]
        beta = torch.sigmoid(mem @ self.w("W_mb", l).T + self.w("b_mb", l)).transpose(1, 2)   # [B, H, M]
        A, z = memory.get(f"armt.A{l}"), memory.get(f"armt.z{l}")
        B, H, M, Dphi = f.shape
        A_new = torch.zeros(B, H, Dphi, v.shape[-1], dtype=x.dtype) if A is None else A.clone()
        z_new = torch.zeros(B, H, Dphi, dtype=x.dtype) if z is None else z.clone()
        for i in range(M):                                                  # every token against the old A, z
            fi = f[:, :, i]                                                 # [B, H, Dphi]
            if A is None:                                                   # the first-segment branch
                vbar, gamma = torch.zeros_like(v[:, :, i]), torch.ones(B, H, dtype=x.dtype)
            else:
                di = (z * fi).sum(-1) + eps                                 # [B, H]
                vbar = torch.einsum("bhf,bhfv->bhv", fi, A) / di[..., None]
                if self.sec.correction:
                    eps2 = 0.0 if self.sec.normalize else eps
                    gamma = (1 - di / ((fi * fi).sum(-1) + eps2)).clamp(0.0, 1.0).detach()
                else:
                    gamma = torch.ones(B, H, dtype=x.dtype)
            A_new = A_new + fi[..., :, None] * (beta[:, :, i, None, None] * (v[:, :, i] - vbar)[..., None, :])
            z_new = z_new + gamma[..., None] * fi
        out[f"armt.A{l}"], out[f"armt.z{l}"] = A_new, z_new
        return x
