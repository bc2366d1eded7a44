fn main() {
    let args: Vec<String> = std::env::args().collect();
    for p in &args[1..] {
        let img = fqvit_calib::decode::load_rgb(std::path::Path::new(p)).unwrap();
        std::fs::write(format!("/tmp/pp_dec_{}.raw", std::path::Path::new(p).file_name().unwrap().to_str().unwrap()), &img.data).unwrap();
        let out = fqvit_calib::data::resize_and_crop(&img, &fqvit_models::Preprocess::VIT);
        std::fs::write(format!("/tmp/pp_{}.raw", std::path::Path::new(p).file_name().unwrap().to_str().unwrap()), &out.data).unwrap();
    }
}
