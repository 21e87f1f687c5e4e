"""Fewer KV heads, initialised from the parent's weights and input statistics (`library.kv_init: pca`).

Mean-pooling the K and V projections of the merged heads (the paper's init, `kv_init: mean`) leaves a child
whose attention output is about as far from the parent's as having no attention at all (nMSE ~1 on SmolLM2,
`benchmarks/kv_init.py`). Here each child KV head j, serving query heads that the parent served from one or
more KV heads ("groups" g), is fitted to them, with C [H, H] the covariance of the normalised attention input:

- Values. Query head h's value path is the map M_h = O_h V_g(h) (hidden -> hidden, rank D). One shared V' [D, H]
  and per-head O'_h [H, D] minimise sum_h ||(O'_h V' - M_h) L||^2 (L L^T = C): in whitened coordinates V'
  spans the top D eigenvectors U of sum_h L^T M_h^T M_h L; V' = U^T L^(-1), O'_h = M_h L U.
- Keys. RoPE rotates each key pair (i, i + D/2) as one complex number, so a child key may mix the groups' keys
  only pair by pair, with complex weights (a real mix across pairs would not commute with the rotation). Per
  pair the child key is the principal direction w of the groups' keys under C (top eigenvector of their Hermitian
  [G, G] covariance kappa C kappa^H, kappa_g the complex weight row of group g's pair), so k_g ~ w_g k'; each
  query head's pair is multiplied by conj(w_g), so its scores against k' approximate those against k_g.
"""

from __future__ import annotations

import torch

from puzzle.model.decoder import GQAAttention


def _cholesky(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """L with L L^T = C + ridge (a relative ridge keeps C positive definite), fp64. Any square root of C serves
    the fits below (||X L||_F = ||X C^(1/2)||_F), and Cholesky is far cheaper than an eigendecomposition."""
    n = c.shape[0]
    c = c + (ridge * float(c.diagonal().mean()) + 1e-12) * torch.eye(n, dtype=c.dtype, device=c.device)
    return torch.linalg.cholesky(c)


def _psd_sqrt(w: torch.Tensor) -> torch.Tensor:
    """W^(1/2) of a small symmetric PSD matrix [D, D]."""
    eigval, eigvec = torch.linalg.eigh(w)
    return (eigvec * eigval.clamp_min(0).sqrt()) @ eigvec.T


def pca_kv_init(parent: GQAAttention, child: GQAAttention, covariance: torch.Tensor, ridge: float) -> None:
    """Set `child`'s q/k/v/o projections (fewer KV heads than `parent`) from `parent`'s; covariance [H, H]."""
    nq, d = parent.num_heads, parent.head_dim
    half_d = d // 2
    kp, kc = parent.num_kv_heads, child.num_kv_heads
    dev = child.q_proj.weight.device
    c = covariance.to(dev, torch.float64)
    root = _cholesky(c, ridge)  # L [H, H]
    group_of_head = torch.arange(nq) // (nq // kp)  # parent KV head serving each query head
    child_of_head = torch.arange(nq) // (nq // kc)
    wq = parent.q_proj.weight.detach().to(dev, torch.float64).view(nq, d, -1)  # [Nq, D, H]
    wk = parent.k_proj.weight.detach().to(dev, torch.float64).view(kp, d, -1)  # [Nkv, D, H]
    wv = parent.v_proj.weight.detach().to(dev, torch.float64).view(kp, d, -1)
    wo = parent.o_proj.weight.detach().to(dev, torch.float64).view(-1, nq, d)  # [H, Nq, D]
    bq, bk, bv = (None if p.bias is None else p.bias.detach().to(dev, torch.float64).view(-1, d)
                  for p in (parent.q_proj, parent.k_proj, parent.v_proj))
    new_q, new_o = wq.clone(), wo.clone()
    new_k, new_v = wk.new_zeros(kc, d, wk.shape[-1]), wv.new_zeros(kc, d, wv.shape[-1])
    new_bq = None if bq is None else bq.clone()
    new_bk = None if bk is None else bk.new_zeros(kc, d)
    new_bv = None if bv is None else bv.new_zeros(kc, d)
    keys_whitened = wk @ root  # [Nkv, D, H]: kappa C kappa^H = (kappa L) (kappa L)^H, one product
    for j in range(kc):
        heads = (child_of_head == j).nonzero().flatten().tolist()
        groups = sorted({int(group_of_head[h]) for h in heads})
        # values: the shared subspace that keeps most of every head's value path. With M_h = O_h V_g and
        # A_g = V_g L [D, H], sum_h (M_h L)^T (M_h L) = B^T B for B the rows W_g^(1/2) A_g stacked over the groups
        # (W_g = sum_{h in g} O_h^T O_h, [D, D]): its top D eigenvectors are B's top D right singular vectors,
        # a thin SVD of a [G*D, H] matrix instead of anything H x H.
        whitened = {g: wv[g] @ root for g in groups}  # A_g [D, H]
        stacked = torch.cat([_psd_sqrt(sum(wo[:, h, :].T @ wo[:, h, :] for h in heads if group_of_head[h] == g))
                             @ whitened[g] for g in groups])  # B [G*D, H]
        basis = torch.linalg.svd(stacked, full_matrices=False).Vh[:d].T  # U [H, D]
        new_v[j] = torch.linalg.solve_triangular(root.T, basis, upper=True).T  # U^T L^-1 [D, H]
        for h in heads:
            new_o[:, h, :] = wo[:, h, :] @ (whitened[int(group_of_head[h])] @ basis)  # O_h V_g L U [H, D]
        # The fit fixes only the products O'_h V'; as it comes, V' = U^T L^-1 is ~20x smaller than the parent's
        # values and O' as much larger, and AdamW's steps (about lr per element, whatever the scale) would then
        # wreck V' at the first step. Each value dimension is rescaled to the parent's value-row norm, O'
        # inversely: the same products, parent-like magnitudes.
        rescale = wv[groups].norm(dim=2).mean() / new_v[j].norm(dim=1).clamp_min(1e-30)  # [D]
        new_v[j] *= rescale[:, None]
        for h in heads:
            new_o[:, h, :] /= rescale[None, :]
        if bv is not None:  # the constant each head adds (attention weights sum to 1), by least squares
            target = sum(wo[:, h, :] @ bv[group_of_head[h]] for h in heads)  # [H]
            stacked = sum(new_o[:, h, :] for h in heads)  # [H, D]
            new_bv[j] = torch.linalg.lstsq(stacked, target[:, None]).solution[:, 0]
        # keys and queries, one RoPE pair at a time
        for i in range(half_d):
            kappa = torch.complex(wk[groups, i], wk[groups, i + half_d])  # [G, H]
            white = torch.complex(keys_whitened[groups, i], keys_whitened[groups, i + half_d])  # [G, H]
            covariance_of_keys = white @ white.conj().T  # [G, G] = E[k k^H], Hermitian
            w = torch.linalg.eigh(covariance_of_keys).eigenvectors[:, -1]  # [G], unit: k_g ~ w_g k'
            key = (w.conj()[:, None] * kappa).sum(0)  # [H]
            # the parent's key scale for this pair (k' -> t k', queries / t: the same scores)
            t = kappa.abs().pow(2).sum(1).sqrt().mean() / key.abs().pow(2).sum().sqrt().clamp_min(1e-30)
            key = key * t
            new_k[j, i], new_k[j, i + half_d] = key.real, key.imag
            if bk is not None:
                kb = t * (w.conj() * torch.complex(bk[groups, i], bk[groups, i + half_d])).sum()
                new_bk[j, i], new_bk[j, i + half_d] = kb.real, kb.imag
            for h in heads:
                turn = w[groups.index(int(group_of_head[h]))].conj() / t
                q = torch.complex(wq[h, i], wq[h, i + half_d]) * turn
                new_q[h, i], new_q[h, i + half_d] = q.real, q.imag
                if bq is not None:
                    qb = torch.complex(bq[h, i], bq[h, i + half_d]) * turn
                    new_bq[h, i], new_bq[h, i + half_d] = qb.real, qb.imag
    with torch.no_grad():
        for proj, weight, bias in ((child.q_proj, new_q, new_bq), (child.k_proj, new_k, new_bk),
                                   (child.v_proj, new_v, new_bv), (child.o_proj, new_o, None)):
            proj.weight.copy_(weight.reshape(proj.weight.shape))
            if bias is not None:
                proj.bias.copy_(bias.reshape(-1))
