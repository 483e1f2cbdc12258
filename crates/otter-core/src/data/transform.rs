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
    let mut data = Vec::new();
    let (width, height) = decode_into(bytes, &mut data)?;
    Ok(Rgb8 { width, height, data })
}

/// [`decode_rgb`] into a reused buffer (replaced, not appended to); returns (width, height).
fn decode_into(bytes: &[u8], out: &mut Vec<u8>) -> Result<(usize, usize), ImageError> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(bytes, out);
    }
    use image::ImageDecoder;
    let dec = |e: image::ImageError| ImageError::Decode(e.to_string());
    // The common case, an 8-bit RGB PNG, decodes straight into `out`.
    if bytes.starts_with(b"\x89PNG") {
        let d = image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes)).map_err(dec)?;
        if d.color_type() == image::ColorType::Rgb8 {
            let (w, h) = d.dimensions();
            if w == 0 || h == 0 {
                return Err(ImageError::Empty);
            }
            out.clear();
            out.resize(d.total_bytes() as usize, 0);
            d.read_image(out).map_err(dec)?;
            return Ok((w as usize, h as usize));
        }
    }
    let rgb = image::load_from_memory(bytes).map_err(dec)?.into_rgb8(); // no copy when already RGB8
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(ImageError::Empty);
    }
    *out = rgb.into_raw();
    Ok((w as usize, h as usize))
}

/// JPEG through libjpeg-turbo, the library Pillow bundles (src/data/jpeg_shim.c, linked
/// statically): the same IDCT and "fancy" chroma upsampling, so the same pixels as PIL.
fn decode_jpeg(bytes: &[u8], buf: &mut Vec<u8>) -> Result<(usize, usize), ImageError> {
    use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
    extern "C" {
        fn otter_jpeg_decode(
            data: *const u8,
            len: c_ulong,
            ctx: *mut c_void,
            alloc: extern "C" fn(*mut c_void, c_uint, c_uint, c_int) -> *mut u8,
            msg: *mut c_char,
            msg_len: usize,
        ) -> c_int;
    }
    struct Out<'a> {
        width: usize,
        height: usize,
        components: usize,
        data: &'a mut Vec<u8>,
    }
    extern "C" fn alloc(ctx: *mut c_void, w: c_uint, h: c_uint, c: c_int) -> *mut u8 {
        // SAFETY: ctx is the `Out` passed below, alive for the whole call.
        let out = unsafe { &mut *(ctx as *mut Out) };
        let Some(n) = (w as usize).checked_mul(h as usize).and_then(|n| n.checked_mul(c as usize)) else {
            return std::ptr::null_mut();
        };
        out.data.clear();
        if out.data.try_reserve_exact(n).is_err() {
            return std::ptr::null_mut();
        }
        out.data.resize(n, 0);
        (out.width, out.height, out.components) = (w as usize, h as usize, c as usize);
        out.data.as_mut_ptr()
    }
    let mut out = Out { width: 0, height: 0, components: 0, data: buf };
    let mut msg = [0 as c_char; 200];
    // SAFETY: `bytes` outlives the call; the shim writes at most msg.len() bytes (NUL
    // included) into msg and only into the buffer `alloc` returned, within its size.
    let rc = unsafe {
        otter_jpeg_decode(bytes.as_ptr(), bytes.len() as c_ulong, &mut out as *mut Out as *mut c_void, alloc, msg.as_mut_ptr(), msg.len())
    };
    if rc != 0 {
        // SAFETY: the shim NUL-terminates what it writes (snprintf); msg starts zeroed.
        let text = unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned();
        return Err(ImageError::Decode(format!("JPEG: {text}")));
    }
    if out.width == 0 || out.height == 0 {
        return Err(ImageError::Empty);
    }
    if out.components == 4 {
        // PIL's CMYK -> RGB for Adobe (inverted) JPEGs: r = c * k / 255, in place.
        let n = out.width * out.height;
        for i in 0..n {
            let k = out.data[4 * i + 3] as u32;
            for c in 0..3 {
                out.data[3 * i + c] = ((out.data[4 * i + c] as u32 * k) / 255) as u8;
            }
        }
        out.data.truncate(3 * n);
    }
    Ok((out.width, out.height))
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
    let mut data = Vec::new();
    resize_into(&img.data, img.width, img.height, out_w, out_h, &mut ResizeBufs::default(), &mut data);
    Rgb8 { width: out_w, height: out_h, data }
}

/// Intermediate buffers of [`resize_into`], reused from image to image.
#[derive(Default)]
struct ResizeBufs {
    transposed: Vec<u8>,
    filtered: Vec<u8>,
    horizontal: Vec<u8>,
    acc: Vec<i32>,
}

/// [`resize_bicubic`] of the RGB image `src` (in_w x in_h) into `out` (replaced).
fn resize_into(src: &[u8], in_w: usize, in_h: usize, out_w: usize, out_h: usize, b: &mut ResizeBufs, out: &mut Vec<u8>) {
    let cv = coeffs(in_h, out_h);
    // Rows of the source that the vertical pass reads.
    let ybox_first = cv.bounds[0].0;
    let ybox_last = cv.bounds[out_h - 1].0 + cv.bounds[out_h - 1].1;

    let (tmp, tmp_w, row0) = if out_w != in_w {
        let ch = coeffs(in_w, out_w);
        let rows = ybox_last - ybox_first;
        // Transpose the used rows to (in_w, rows, 3), filter "rows" = source columns,
        // transpose back to (rows, out_w, 3).
        let band = &src[ybox_first * in_w * 3..ybox_last * in_w * 3];
        transpose3(band, rows, in_w, &mut b.transposed);
        filter_rows(&b.transposed, rows * 3, &ch, 0, &mut b.acc, &mut b.filtered);
        transpose3(&b.filtered, out_w, rows, &mut b.horizontal);
        (&b.horizontal[..], out_w, ybox_first)
    } else {
        (src, in_w, 0)
    };
    if out_h == in_h {
        out.clear();
        out.extend_from_slice(tmp);
        return;
    }
    filter_rows(tmp, tmp_w * 3, &cv, row0, &mut b.acc, out);
}

/// (h, w, 3) -> (w, h, 3), in 16 x 16 tiles, into `out` (replaced).
fn transpose3(src: &[u8], h: usize, w: usize, out: &mut Vec<u8>) {
    let (src_px, _) = src.as_chunks::<3>();
    out.clear();
    out.resize(src.len(), 0);
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
}

/// Output row i = clip8(bias + sum_j w[i][j] * row[bounds[i].0 - shift + j]) over rows of
/// `row_len` bytes, into `out` (replaced); `acc` is scratch.
fn filter_rows(src: &[u8], row_len: usize, c: &Coeffs, shift: usize, acc: &mut Vec<i32>, out: &mut Vec<u8>) {
    let n_out = c.bounds.len();
    out.clear();
    out.resize(n_out * row_len, 0);
    acc.resize(row_len, 0);
    let acc = &mut acc[..row_len];
    for (i, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, n) = c.bounds[i];
        let k = &c.weights[i * c.ksize..][..n];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (j, &w) in k.iter().enumerate() {
            accumulate(acc, &src[(first - shift + j) * row_len..][..row_len], w);
        }
        for (o, &a) in orow.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
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
    push_resized_normalized(&img.data, img.width, img.height, size, &mut ResizeBufs::default(), &mut Vec::new(), out);
}

/// Resizes the RGB image `src` (w x h) to S x S unless it already is (into `resized`), then
/// appends it as (3, S, S) f32, /255 and normalized.
fn push_resized_normalized(src: &[u8], w: usize, h: usize, size: usize, bufs: &mut ResizeBufs, resized: &mut Vec<u8>, out: &mut Vec<f32>) {
    if (w, h) == (size, size) {
        push_normalized(src, size, out);
    } else {
        resize_into(src, w, h, size, size, bufs, resized);
        push_normalized(resized, size, out);
    }
}

/// Appends the S x S RGB image `rgb` as (3, S, S) f32, /255 and normalized.
fn push_normalized(rgb: &[u8], size: usize, out: &mut Vec<f32>) {
    let plane = size * size;
    let start = out.len();
    out.resize(start + 3 * plane, 0.0);
    let (p0, rest) = out[start..].split_at_mut(plane);
    let (p1, p2) = rest.split_at_mut(plane);
    // torchvision: x.float().div(255), then (x - mean) / std, all in f32; a value depends
    // only on the byte, so a 256-entry table per channel gives the same floats.
    let lut = normalize_lut();
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        p0[i] = lut[0][px[0] as usize];
        p1[i] = lut[1][px[1] as usize];
        p2[i] = lut[2][px[2] as usize];
    }
}

/// Per-thread buffers of [`preprocess`], reused from image to image. Allocating them per
/// image (~2 MB in five pieces for a 480 px photo) let glibc hand the memory back to the
/// kernel and fault it in again every time: 15% of the pipeline's time.
#[derive(Default)]
struct Scratch {
    decoded: Vec<u8>,
    resized: Vec<u8>,
    resize: ResizeBufs,
}

impl Scratch {
    /// Above this, buffers are dropped after use rather than kept (one huge image should
    /// not pin its memory in every loader thread).
    const KEEP_BYTES: usize = 64 << 20;

    fn trim(&mut self) {
        if self.decoded.capacity() + self.resize.transposed.capacity() > Self::KEEP_BYTES {
            *self = Scratch::default();
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Decode + transform in one step: appends (3, S, S) f32 to `out`.
pub fn preprocess(bytes: &[u8], size: usize, out: &mut Vec<f32>) -> Result<(), ImageError> {
    SCRATCH.with_borrow_mut(|s| {
        let result = decode_into(bytes, &mut s.decoded)
            .map(|(w, h)| push_resized_normalized(&s.decoded, w, h, size, &mut s.resize, &mut s.resized, out));
        s.trim();
        result
    })
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

    fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    }

    #[test]
    fn jpeg_decodes_rgb_and_grey_like_pil_convert_rgb() {
        let rgb = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 10) as u8, 128]));
        let img = decode_rgb(&encode(rgb.clone().into(), image::ImageFormat::Jpeg)).unwrap();
        assert_eq!((img.width, img.height, img.data.len()), (40, 24, 40 * 24 * 3));
        // Lossy, but close to what was encoded.
        let err = img.data.iter().zip(rgb.as_raw()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        assert!(err < 24, "max pixel error {err}");
        // Greyscale JPEGs come out as RGB with three equal channels.
        let grey = image::GrayImage::from_fn(9, 7, |x, y| image::Luma([(x * 20 + y) as u8]));
        let img = decode_rgb(&encode(grey.into(), image::ImageFormat::Jpeg)).unwrap();
        assert_eq!((img.width, img.height), (9, 7));
        assert!(img.data.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    #[test]
    fn truncated_or_garbage_jpeg_is_an_error_not_grey_pixels() {
        let rgb = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let bytes = encode(rgb.into(), image::ImageFormat::Jpeg);
        for cut in [bytes.len() / 2, 200, 3] {
            let e = decode_rgb(&bytes[..cut]).unwrap_err();
            assert!(matches!(e, ImageError::Decode(ref m) if m.starts_with("JPEG:")), "cut at {cut}: {e}");
        }
        let mut garbage = vec![0xFF, 0xD8];
        garbage.extend((0..500u32).map(|i| (i * 7) as u8));
        assert!(matches!(decode_rgb(&garbage), Err(ImageError::Decode(_))));
    }
}
