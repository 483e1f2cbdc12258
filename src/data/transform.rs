//! Image decoding and upstream's training transform, bit-compatible with Pillow:
//! decode -> RGB -> `resize((S, S), BICUBIC)` -> /255 -> normalize(mean, std).
//!
//! The resize is a port of Pillow's `Resample.c` (8-bit path): separable convolution
//! with the a = -0.5 cubic kernel, support widened by the scale when shrinking
//! (antialiasing), coefficients in 22-bit fixed point, horizontal pass first, each pass
//! rounded and clipped to u8. Same arithmetic, same bytes as PIL for the same decoded
//! pixels (PNG exact; JPEG within decoder IDCT rounding).

/// OpenAI CLIP normalization, as upstream's training transform uses it.
pub const MEAN: [f32; 3] = [0.481, 0.458, 0.408];
pub const STD: [f32; 3] = [0.269, 0.261, 0.276];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("image has zero size")]
    Empty,
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes PNG or JPEG bytes into RGB (alpha dropped, grey replicated, as PIL's
/// `convert("RGB")`).
pub fn decode_rgb(bytes: &[u8]) -> Result<Rgb8, ImageError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(bytes);
    }
    let img = image::load_from_memory(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
    let rgb = img.into_rgb8(); // no copy when already RGB8
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(ImageError::Empty);
    }
    Ok(Rgb8 { width: w as usize, height: h as usize, data: rgb.into_raw() })
}

/// JPEG through `jpeg-decoder`, whose chroma upsampling is libjpeg's "fancy" (triangle)
/// filter, as in the libjpeg-turbo PIL uses; other decoders differ visibly on 4:2:0 images.
fn decode_jpeg(bytes: &[u8]) -> Result<Rgb8, ImageError> {
    use jpeg_decoder::PixelFormat;
    let mut d = jpeg_decoder::Decoder::new(bytes);
    let pixels = d.decode().map_err(|e| ImageError::Decode(e.to_string()))?;
    let info = d.info().ok_or_else(|| ImageError::Decode("no JPEG header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        return Err(ImageError::Empty);
    }
    let data = match info.pixel_format {
        PixelFormat::RGB24 => pixels,
        PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        PixelFormat::L16 => pixels.chunks_exact(2).flat_map(|c| [c[0], c[0], c[0]]).collect(),
        PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|c| {
                // PIL's CMYK -> RGB for Adobe (inverted) JPEGs: r = c * k / 255.
                let k = c[3] as u32;
                [c[0], c[1], c[2]].map(|v| ((v as u32 * k) / 255) as u8)
            })
            .collect(),
    };
    Ok(Rgb8 { width: w, height: h, data })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of taps, fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let support_base = 2.0; // bicubic
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support_base * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // (int) casts truncate toward zero, as in C.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < xmax && ww != 0.0 { k[x] / ww } else if x < xmax { k[x] } else { 0.0 };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1i32 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// PIL `Image.resize((out_w, out_h), Image.BICUBIC)` on an RGB image.
///
/// Same integer arithmetic as Pillow (i32 accumulators with a rounding bias, clip to u8
/// after each pass, horizontal pass first). Integer sums do not depend on order, so both
/// passes are written as "accumulate whole rows" (the horizontal one on the transposed
/// image), which vectorizes; AVX2 is used when the CPU has it.
pub fn resize_bicubic(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    let (in_w, in_h) = (img.width, img.height);
    let cv = coeffs(in_h, out_h);
    // Rows of the source that the vertical pass reads.
    let ybox_first = cv.bounds[0].0;
    let ybox_last = cv.bounds[out_h - 1].0 + cv.bounds[out_h - 1].1;

    let (tmp, tmp_w, row0) = if out_w != in_w {
        let ch = coeffs(in_w, out_w);
        let rows = ybox_last - ybox_first;
        // Transpose the used rows to (in_w, rows, 3), filter "rows" = source columns,
        // transpose back to (rows, out_w, 3).
        let band = &img.data[ybox_first * in_w * 3..ybox_last * in_w * 3];
        let t = transpose3(band, rows, in_w);
        let filtered = filter_rows(&t, rows * 3, &ch, 0);
        (transpose3(&filtered, out_w, rows), out_w, ybox_first)
    } else {
        (img.data.clone(), in_w, 0)
    };
    if out_h == in_h {
        return Rgb8 { width: tmp_w, height: out_h, data: tmp };
    }
    let out = filter_rows(&tmp, tmp_w * 3, &cv, row0);
    Rgb8 { width: tmp_w, height: out_h, data: out }
}

/// (h, w, 3) -> (w, h, 3), in 16 x 16 tiles.
fn transpose3(src: &[u8], h: usize, w: usize) -> Vec<u8> {
    let (src_px, _) = src.as_chunks::<3>();
    let mut out = vec![0u8; src.len()];
    let (out_px, _) = out.as_chunks_mut::<3>();
    const T: usize = 16;
    for y0 in (0..h).step_by(T) {
        for x0 in (0..w).step_by(T) {
            for y in y0..(y0 + T).min(h) {
                for x in x0..(x0 + T).min(w) {
                    out_px[x * h + y] = src_px[y * w + x];
                }
            }
        }
    }
    out
}

/// Output row i = clip8(bias + sum_j w[i][j] * row[bounds[i].0 - shift + j]) over rows of
/// `row_len` bytes.
fn filter_rows(src: &[u8], row_len: usize, c: &Coeffs, shift: usize) -> Vec<u8> {
    let n_out = c.bounds.len();
    let mut out = vec![0u8; n_out * row_len];
    let mut acc = vec![0i32; row_len];
    for (i, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, n) = c.bounds[i];
        let k = &c.weights[i * c.ksize..][..n];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (j, &w) in k.iter().enumerate() {
            accumulate(&mut acc, &src[(first - shift + j) * row_len..][..row_len], w);
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[inline(always)]
fn accumulate_generic(acc: &mut [i32], src: &[u8], w: i32) {
    for (a, &p) in acc.iter_mut().zip(src) {
        *a = a.wrapping_add(p as i32 * w);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(acc: &mut [i32], src: &[u8], w: i32) {
    accumulate_generic(acc, src, w)
}

fn accumulate(acc: &mut [i32], src: &[u8], w: i32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { accumulate_avx2(acc, src, w) };
        }
    }
    accumulate_generic(acc, src, w)
}

fn normalize_lut() -> &'static [[f32; 256]; 3] {
    static LUT: std::sync::OnceLock<[[f32; 256]; 3]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
        t
    })
}

/// (3, S, S) f32, channel-major: resize to S x S, /255, normalize. Appends to `out`.
pub fn to_normalized_chw(img: &Rgb8, size: usize, out: &mut Vec<f32>) {
    let resized;
    let r = if img.width == size && img.height == size {
        img
    } else {
        resized = resize_bicubic(img, size, size);
        &resized
    };
    let plane = size * size;
    let start = out.len();
    out.resize(start + 3 * plane, 0.0);
    let (p0, rest) = out[start..].split_at_mut(plane);
    let (p1, p2) = rest.split_at_mut(plane);
    // torchvision: x.float().div(255), then (x - mean) / std, all in f32; a value depends
    // only on the byte, so a 256-entry table per channel gives the same floats.
    let lut = normalize_lut();
    for (i, px) in r.data.chunks_exact(3).enumerate() {
        p0[i] = lut[0][px[0] as usize];
        p1[i] = lut[1][px[1] as usize];
        p2[i] = lut[2][px[2] as usize];
    }
}

/// Decode + transform in one step.
pub fn preprocess(bytes: &[u8], size: usize, out: &mut Vec<f32>) -> Result<(), ImageError> {
    let img = decode_rgb(bytes)?;
    to_normalized_chw(&img, size, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_untouched_and_constant_images_stay_constant() {
        let img = Rgb8 { width: 7, height: 5, data: vec![200; 7 * 5 * 3] };
        for (w, h) in [(7, 5), (3, 2), (20, 30), (1, 1)] {
            let r = resize_bicubic(&img, w, h);
            assert_eq!((r.width, r.height), (w, h));
            assert!(r.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn cubic_kernel_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(300, 224), (64, 224), (31, 224), (500, 224)] {
            let c = coeffs(i, o);
            for xx in 0..o {
                let s: i64 = c.weights[xx * c.ksize..][..c.bounds[xx].1].iter().map(|&w| w as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64, "{i}->{o} at {xx}: {s}");
            }
        }
    }
}
