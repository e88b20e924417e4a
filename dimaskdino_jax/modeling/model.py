"""DIMaskDINO: backbone -> pixel decoder -> predictor (two-stage selection, DI, DN, decoder with BATO, heads).

Reference sections 1-3. `formulation='official'` reproduces the official code, quirks included (reference
section 10); `'paper'` follows Eq. 1-11. With DI and BATO off and one top-k selection it is MaskDINO.

Shapes: B images, (H, W) canvas, d hidden, C classes, S_e encoder tokens, K = k1, Q = k2 (decoder queries),
N_dn = DN slots, (Hm, Wm) = (H/4, W/4) mask-feature map.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimaskdino_jax.box_ops import inverse_sigmoid
from dimaskdino_jax.modeling import selection
from dimaskdino_jax.modeling.backbone import ResNet
from dimaskdino_jax.modeling.bato import BATO
from dimaskdino_jax.modeling.de_imbalance import DeImbalanceStage, ResidualCrossAttention
from dimaskdino_jax.modeling.decoder import DecoderLayer
from dimaskdino_jax.modeling.denoising import dn_attention_mask, dn_layout, dn_queries, draw_dn_noise
from dimaskdino_jax.modeling.encoder import PixelDecoder, flatten_levels, resize_bilinear
from dimaskdino_jax.modeling.layers import MLP, c2_xavier_fill, conv_padding, torch_linear_bias_init, xavier_uniform
from dimaskdino_jax.modeling.outputs import HeadOutputs, Predictions
from dimaskdino_jax.modeling.position import box_sine_embedding, sine_embedding_2d

Array = Any


class Predictor(nn.Module):
  """DIMaskDINODecoder. Shared heads (class_embed, mask_embed, bbox_embed, decoder_norm) are single modules
  called from every place that uses them, as in the official code."""

  cfg: Any  # FrozenConfigDict: the `model` section

  def setup(self):
    m = self.cfg
    d, c = m.hidden_dim, m.num_classes
    dec = m.decoder
    self.enc_output = nn.Dense(d, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(d))
    self.enc_output_norm = nn.LayerNorm(epsilon=1e-5)
    if m.class_prior_prob > 0:  # focal-loss prior (not in the official code, which keeps torch's Linear init)
      bias_init = nn.initializers.constant(-math.log((1 - m.class_prior_prob) / m.class_prior_prob))
    else:
      bias_init = torch_linear_bias_init(d)
    self.class_embed = nn.Dense(
      c, kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'), bias_init=bias_init
    )
    self.mask_embed = MLP(d, d, 3)
    self.bbox_embed = MLP(d, 4, 3, zero_last=True)  # `_bbox_embed`, shared by selection and every layer
    self.decoder_norm = nn.LayerNorm(epsilon=1e-5)
    if m.dn.mode != 'none' and m.dn.num > 0:
      self.label_enc = nn.Embed(c, d, embedding_init=nn.initializers.normal(1.0))
    self.ref_point_head = MLP(d, d, 2)  # decoder.ref_point_head: 2d -> d -> d
    layer_cls = nn.remat(DecoderLayer, static_argnums=(6,)) if m.remat else DecoderLayer
    self.decoder_layers = [
      layer_cls(d, m.encoder.total_num_feature_levels, dec.num_heads, dec.num_points, dec.ffn_dim, m.msda_impl)
      for _ in range(dec.num_layers)
    ]
    ks = tuple(m.di.selection_ks)
    if m.di.enabled:
      self.oldm = [
        DeImbalanceStage(d, m.di.ti_layers, dec.num_heads, dec.ffn_dim, name='oldm' if i == 0 else f'oldm_{i}')
        for i in range(len(ks) - 1)
      ]
      if m.formulation == 'paper':
        self.di_residual = ResidualCrossAttention(d, dec.num_heads, dec.ffn_dim)
    if m.di.random_position_tokens:  # Table 3: learned, image-independent position tokens for the decoder queries
      self.random_refpoints = self.param('random_refpoints', nn.initializers.normal(1.0), (ks[-1], 4))
    if m.bato.enabled:
      self.query_guide_feature_update = BATO(
        d, dec.num_heads, dec.ffn_dim, m.formulation, m.bato.guiding_token_generation
      )
      self.mask_output_conv = nn.Conv(d, (3, 3), padding=conv_padding(3), use_bias=False, kernel_init=c2_xavier_fill())
      self.mask_output_conv_norm = nn.GroupNorm(num_groups=m.encoder.num_groups, epsilon=1e-5)

  # ----------------------------------------------------------------------------------------------- helpers
  def heads(self, x, mask_features, with_masks=True):
    """forward_prediction_heads: decoder_norm, class logits, masks = mask_embed(x) . mask_features."""
    xn = self.decoder_norm(x)
    logits = self.class_embed(xn)
    masks = jnp.einsum('bqc,bhwc->bqhw', self.mask_embed(xn), mask_features) if with_masks else None
    return logits, masks

  def query_pos(self, ref):
    """ref_point_head(gen_sineembed_for_position(ref)): ref (B, Q, 4) sigmoid boxes -> (B, Q, d)."""
    return self.ref_point_head(box_sine_embedding(ref, self.cfg.hidden_dim // 2))

  def select_guides(self, tokens, pos, n):
    """Top-n guiding queries by class score (class_embed without decoder_norm): -> tokens, pos (B, n, d)."""
    idx = selection.topk_indices(self.class_embed(tokens), n)
    return selection.gather_tokens(tokens, idx), selection.gather_tokens(pos, idx), idx

  # ----------------------------------------------------------------------------------------------- forward
  def __call__(self, multi_scale, mask_features, targets=None, train=False, all_layer_masks=False):
    m = self.cfg
    d = m.hidden_dim
    ks = tuple(m.di.selection_ks)
    extras = {}

    # Decoder level order is reversed: [1/64, 1/32, 1/16, 1/8] (reference 1.4).
    maps = multi_scale[::-1]
    memory, shapes = flatten_levels(maps)  # (B, S, d)
    b = memory.shape[0]
    pos_flatten = jnp.concatenate([sine_embedding_2d(h, w, d // 2).reshape(h * w, d) for h, w in shapes], 0)

    # Two-stage selection (reference 1.5).
    proposals, valid = selection.encoder_proposals(shapes)  # (S, 4) logits, (S,)
    output_memory = self.enc_output_norm(self.enc_output(jnp.where(valid[None, :, None], memory, 0.0)))
    enc_logits = self.class_embed(output_memory)  # (B, S, C), no decoder_norm
    enc_boxes = self.bbox_embed(output_memory) + proposals[None]  # (B, S, 4) unsigmoided
    idx = selection.topk_indices(enc_logits, ks[0])  # (B, K)
    extras['enc_topk_index'] = idx
    ref_undetach = selection.gather_tokens(enc_boxes, idx)  # (B, K, 4)
    tgt_undetach = selection.gather_tokens(output_memory, idx)  # (B, K, d)
    interm_logits, interm_masks = self.heads(tgt_undetach, mask_features)
    interm = HeadOutputs(interm_logits, jax.nn.sigmoid(ref_undetach), interm_masks if train else None)
    tgt = jax.lax.stop_gradient(tgt_undetach)
    if m.decoder.box_init == 'none':
      refpoint = jax.lax.stop_gradient(ref_undetach)
    else:
      refpoint = selection.mask2box_anchors(interm_masks, plus_one=m.decoder.box_init == 'bitmask')

    guides = {}  # token sets BATO may be guided by: name -> (tokens (B, n, d), ref (B, n, 4) sigmoid)
    if m.bato.enabled and m.bato.guidance == 'T_i':
      guides['T_i'] = (output_memory, jax.nn.sigmoid(enc_boxes))
    guides['T_s1'] = (tgt, jax.nn.sigmoid(refpoint))

    # De-Imbalance (reference 2.1): selections ks[1:], token interaction before each.
    di_aux = None
    di_aux_more = ()
    if m.di.enabled:
      aux = []
      for stage, k in zip(self.oldm, ks[1:]):
        out_raw, new_ref, normed, boxes = stage(tgt, refpoint)
        logits = self.class_embed(self.decoder_norm(normed))  # (T, B, K, C): double LayerNorm quirk
        aux.append(HeadOutputs(logits, boxes))
        sel = selection.topk_indices(self.class_embed(stage.norm(out_raw)), k)  # (B, k)
        extras[f'di_topk_index_{len(aux) - 1}'] = sel
        tgt = selection.gather_tokens(out_raw, sel)
        refpoint = inverse_sigmoid(selection.gather_tokens(new_ref, sel))
      di_aux, di_aux_more = aux[0], tuple(aux[1:])
      guides['T_s2'] = (tgt, jax.nn.sigmoid(refpoint))
      if m.formulation == 'paper':
        tgt = self.di_residual(tgt, self.oldm[-1].query_pos(jax.nn.sigmoid(refpoint)), memory, pos_flatten[None])
    if m.di.random_position_tokens:  # Q_bal's position tokens (without DI: the selected anchors') replaced
      refpoint = jnp.broadcast_to(self.random_refpoints[None], refpoint.shape)
    guides['Q_bal'] = (tgt, jax.nn.sigmoid(refpoint))
    extras['q_bal'] = tgt

    # Denoising queries (reference 3), static S = dn.num slots.
    use_dn = train and targets is not None and m.dn.mode != 'none' and m.dn.num > 0
    q = tgt.shape[1]
    if use_dn:
      info, group = dn_layout(targets['valid'], m.dn.num)
      noise = targets.get('dn_noise')  # a DnNoise given with the targets (parity tests), else drawn here
      if noise is None:
        noise = draw_dn_noise(self.make_rng('dn'), info.positive.shape, m.num_classes, m.dn.noise_scale)
      dn_content, dn_anchor = dn_queries(
        noise, targets['labels'], targets['boxes'], info, m.dn.noise_scale, self.label_enc
      )
      tgt = jnp.concatenate([dn_content, tgt], 1)
      refpoint = jnp.concatenate([dn_anchor, refpoint], 1)
      attn_mask = dn_attention_mask(group, q)
      n_dn = m.dn.num
    else:
      info, attn_mask, n_dn = None, None, 0
      if m.dn.mode != 'none' and m.dn.num > 0 and self.is_initializing():
        self.label_enc(jnp.zeros((1,), jnp.int32))  # create the DN embedding even when init runs without DN

    # Decoder with iterative box refinement ("look forward twice") and BATO (reference 1.6, 2.2).
    ref0 = jax.nn.sigmoid(refpoint)  # (B, N_dn + Q, 4), not detached
    references = [ref0]
    ref = ref0
    output = tgt
    hs = []
    layer_mask_features = []
    cur_mask_features = mask_features
    cur_memory = memory
    num_layers = m.decoder.num_layers
    for lid, layer in enumerate(self.decoder_layers):
      query_pos = self.query_pos(ref)
      if m.bato.enabled and lid == m.bato.layer:
        if m.bato.guidance == 'decoder0':
          g_tokens, g_pos = output[:, n_dn:], query_pos[:, n_dn:]  # un-normed previous output, matching part
        else:
          g_tokens, g_ref = guides[m.bato.guidance]
          g_pos = self.query_pos(g_ref)
        g_tokens, g_pos, g_idx = self.select_guides(g_tokens, g_pos, m.bato.num_guiding_tokens)
        extras['bato_topk_index'] = g_idx
        cur_memory = self.query_guide_feature_update(cur_memory, pos_flatten[None], g_tokens, g_pos, self.mask_embed)
        fine = cur_memory[:, -shapes[-1][0] * shapes[-1][1] :].reshape(b, *shapes[-1], d)  # the 1/8 level
        fused = mask_features + resize_bilinear(fine, mask_features.shape[1:3])
        cur_mask_features = nn.relu(self.mask_output_conv_norm(self.mask_output_conv(fused)))
        extras['bato_memory'] = cur_memory
        extras['updated_mask_features'] = cur_mask_features
      output = layer(output, query_pos, ref, cur_memory, attn_mask, shapes)
      new_ref = jax.nn.sigmoid(self.bbox_embed(output) + inverse_sigmoid(ref))
      references.append(new_ref)
      ref = jax.lax.stop_gradient(new_ref)
      hs.append(self.decoder_norm(output))
      layer_mask_features.append(cur_mask_features)

    # Heads: [initial prediction, layer 0, ..., L-1].
    all_masks = train or all_layer_masks
    logits0, masks0 = self.heads(tgt, mask_features, with_masks=all_masks)
    logits, boxes, masks = [logits0], [ref0], [masks0]
    for lid in range(num_layers):
      last = lid == num_layers - 1
      lg, mk = self.heads(hs[lid], layer_mask_features[lid], with_masks=all_masks or last)
      logits.append(lg)
      boxes.append(jax.nn.sigmoid(self.bbox_embed(hs[lid]) + inverse_sigmoid(references[lid])))
      masks.append(mk)
    logits, boxes = jnp.stack(logits), jnp.stack(boxes)  # (N, B, N_dn + Q, ...)
    masks = jnp.stack(masks) if all_masks else masks[-1][None]
    if not m.decoder.initial_pred:
      logits, boxes = logits[1:], boxes[1:]
      masks = masks[1:] if all_masks else masks

    layers = HeadOutputs(logits[:, :, n_dn:], boxes[:, :, n_dn:], masks[:, :, n_dn:])
    dn = None
    if use_dn:
      dn = HeadOutputs(logits[:, :, :n_dn], boxes[:, :, :n_dn], masks[:, :, :n_dn])
    return Predictions(
      layers=layers, interm=interm, di_aux=di_aux, di_aux_more=di_aux_more, dn=dn, dn_info=info, extras=extras
    )


class DIMaskDINO(nn.Module):
  """images uint8/float (B, H, W, 3) RGB 0-255 -> Predictions.

  `image_hw` (B, 2), when given, zeroes the normalized pixels outside each image (the official ImageList pads
  with 0 after normalization). `targets` (dict with 'boxes', 'labels', 'valid', optionally 'dn_noise': a
  denoising.DnNoise used instead of drawing the DN noise) feed DN in training; `train`
  selects DN and all-layer masks; rng collection 'dn' is needed when DN runs.
  """

  cfg: Any  # FrozenConfigDict: the `model` section of a config

  def setup(self):
    m = self.cfg
    bb = m.backbone
    self.backbone = ResNet(
      bb.depth,
      bb.stem_width,
      bb.width,
      bb.res2_out_channels,
      bb.freeze_at,
      jnp.bfloat16 if bb.dtype == 'bfloat16' else jnp.float32,
      bb.norm,
      bb.norm_groups,
    )
    e = m.encoder
    self.pixel_decoder = PixelDecoder(
      m.hidden_dim,
      e.num_layers,
      e.num_heads,
      e.num_points,
      e.ffn_dim,
      e.total_num_feature_levels,
      e.num_groups,
      m.msda_impl,
      m.remat,
    )
    self.predictor = Predictor(m)

  def normalize(self, images, image_hw=None):
    mean = jnp.asarray(self.cfg.pixel_mean, jnp.float32)
    std = jnp.asarray(self.cfg.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    if image_hw is not None:
      h, w = x.shape[1:3]
      inside = (jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]
      )
      x = jnp.where(inside[..., None], x, 0.0)
    return x

  def __call__(self, images, targets=None, train=False, image_hw=None, all_layer_masks=False):
    x = self.normalize(images, image_hw)
    features = self.backbone(x)
    mask_features, multi_scale = self.pixel_decoder(features)
    return self.predictor(multi_scale, mask_features, targets, train, all_layer_masks)


def build_model(config) -> DIMaskDINO:
  """The model for a full config (uses `config.model`)."""
  from ml_collections import FrozenConfigDict

  return DIMaskDINO(FrozenConfigDict(config.model))
